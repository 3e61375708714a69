"""``python -m torch_softmix``: the ``softmix`` command (also under ``torchrun --nproc-per-node N -m torch_softmix``)."""

import sys

from .cli import main

sys.exit(main())
