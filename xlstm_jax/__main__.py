import sys

from xlstm_jax.cli import main

sys.exit(main())
