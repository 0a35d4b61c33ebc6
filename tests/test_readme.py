"""The README's set-up commands are the product's front door: CI must run exactly the documented one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .venv && [^\n]+)\n```", (ROOT / "README.md").read_text())


def test_readme_has_the_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("gptforge train")
    assert "pytest" in commands[1] and "torch==2.13.0" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [_readme_commands()[1]]


def test_the_python_api_exports_every_command():
    import gptforge
    import gptforge.generation  # noqa: F401  importing submodules must not replace the functions
    import gptforge.train.trainer  # noqa: F401
    from gptforge.generation.api import generate as generate_function
    from gptforge.train.trainer import train as train_function
    for name in gptforge.__all__:
        assert getattr(gptforge, name) is not None, name
    assert gptforge.generate is generate_function
    assert gptforge.train is train_function
