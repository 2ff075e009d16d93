"""Python SDK for the histoxplain gRPC gateway."""
