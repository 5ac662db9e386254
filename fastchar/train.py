"""``python -m fastchar.train [flags]``: train a character language model.

The training side lives in ``fastchar.training`` (config, corpora, checkpoint, loop, cli);
this module is its command-line entry point, as before.
"""

from fastchar.training.cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())
