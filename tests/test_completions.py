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


def test_help_and_completion_do_not_import_torch():
    """Shell completion runs the program at every TAB: importing torch, torchvision and timm cost
    about 7 s of each answer. The options and their choices are declared without them."""
    import os

    code = ("import runpy, sys\n"
            "sys.argv = ['l2ul', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('l2ul_cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    for args, env in ((["forget", "--help"], {}),
                      ([], {"_L2UL_COMPLETE": "complete_bash", "COMP_WORDS": "l2ul relabel --me", "COMP_CWORD": "2"})):
        r = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.stdout.strip().endswith("NO-TORCH"), r.stdout[-500:] + r.stderr[-2000:]
        assert "--method" in r.stdout
