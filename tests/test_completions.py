import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_completion_scripts_are_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "completions" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_completion_scripts_name_the_program():
    for name in ("l2ul.bash", "_l2ul", "l2ul.fish"):
        text = (ROOT / "completions" / name).read_text()
        assert "_L2UL_COMPLETE" in text and "l2ul" in text


def test_bash_completion_answers_commands_and_options():
    import os

    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_L2UL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        r = subprocess.run([sys.executable, "-m", "l2ul_cli"], env=env, capture_output=True, text=True)
        return r.stdout.split()

    assert complete("l2ul fo", 1) == ["forget"]
    assert "--method" in complete("l2ul forget --me", 2)
