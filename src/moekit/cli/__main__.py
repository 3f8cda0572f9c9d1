"""``python -m moekit.cli``: the ``moekit`` command."""

from moekit.cli import run

if __name__ == "__main__":
    run()
