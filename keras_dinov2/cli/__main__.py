"""`python -m keras_dinov2.cli ...`: the `keras-dinov2` command (torchrun starts it this way)."""

import sys

from keras_dinov2.cli import main

sys.exit(main())
