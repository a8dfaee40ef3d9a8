"""Command line entry point: parse flags into a Config and hand it to the library. Nothing else."""

import os
import sys

from absl import app
from absl import logging

from tl_keras import flags
from tl_keras.errors import Interrupted, UserError


def main(argv):
    del argv  # flags.parse refuses positional arguments.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow leaves oneDNN off on some x86 CPUs (AMD); with it, CPU backward passes run ~2.5x faster.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    try:
        config = flags.get_config()
        # TensorFlow loads only once the flags are known to be good.
        from tl_keras.training import run as run_lib

        run_lib.run(config)
    except UserError as e:
        sys.exit(f"tl_keras: error: {e}")
    except Interrupted as e:  # Saved where it stopped; 143 for SIGTERM, 130 for SIGINT, as shells expect.
        logging.warning("%s", e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the run installed its own handler: nothing to save yet.
        logging.warning("Stopped by SIGINT before the run began.")
        sys.exit(130)


def run():
    """Console-script entry point (`tl-keras`)."""
    app.run(main, flags_parser=flags.parse)


if __name__ == "__main__":
    run()
