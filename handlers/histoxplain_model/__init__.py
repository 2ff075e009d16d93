"""histoxplain."""
