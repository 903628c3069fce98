"""Write the shell completion scripts in completions/ from the Typer app.

    python completions/generate.py          # rewrite the files
    python completions/generate.py --check  # exit 1 if they are out of date (a test runs this)

The scripts call back into ``l2ul`` for candidates, so commands and options added later complete
without regenerating; only the program name and Typer's protocol are baked in.
"""

from __future__ import annotations

import sys
from pathlib import Path

from typer._completion_shared import get_completion_script  # Typer is pinned below 0.26

HERE = Path(__file__).parent
FILES = {"bash": "l2ul.bash", "zsh": "_l2ul", "fish": "l2ul.fish"}


def scripts() -> dict[str, str]:
    return {
        name: get_completion_script(prog_name="l2ul", complete_var="_L2UL_COMPLETE", shell=shell).strip() + "\n"
        for shell, name in FILES.items()
    }


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for name, text in scripts().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)} (run python completions/generate.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
