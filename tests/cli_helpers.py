"""Running the CLI in-process and checking its bad-input contract (shared by the CLI test files)."""

import contextlib
import io

from moekit.cli import main


def run_cli(argv) -> tuple[int, str, str]:
    """Run ``moekit argv`` in-process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_error(code: int, err: str, *patterns: str) -> str:
    """Assert the CLI contract for bad input: exit 2, exactly one stderr line ``error: ...``, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    return lines[0]
