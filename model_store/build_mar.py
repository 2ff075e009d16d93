"""Build the histoxplain TorchServe model archive: ``python model_store/build_mar.py --help``.

The builder is ``histoxplain_service.backends.torchserve.mar`` (used by ``make serve`` and the
test fixtures too); this script is its command line from a checkout.
"""

import sys

from histoxplain_service.backends.torchserve.mar import main

if __name__ == "__main__":
    sys.exit(main())
