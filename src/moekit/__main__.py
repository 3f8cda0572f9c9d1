"""``python -m moekit``: the ``moekit`` command (what ``torchrun -m moekit ...`` starts on every rank)."""

from moekit.cli import run

if __name__ == "__main__":
    run()
