"""The README's set-up commands are the product's front door: CI must run exactly the documented one."""

import re
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .venv && [^\n]+)\n```", (ROOT / "README.md").read_text())


def test_readme_has_the_setup_test_and_slow_suite_commands():
    commands = _readme_commands()
    assert len(commands) == 3
    assert commands[0].endswith("gptforge train && .venv/bin/gptforge sft")
    assert "pytest" in commands[1] and "torch==2.13.0" in commands[1] and "-m slow" not in commands[1]
    slow = commands[2]
    assert slow.endswith("-m pytest -q -m slow") and '".[dev,eval,llama]"' in slow


def test_the_slow_suite_command_installs_what_the_slow_tests_import():
    """Every optional package a slow test imports comes with the extras the slow command installs."""
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = " ".join(extras["dev"] + extras["eval"] + extras["llama"])
    for package in ("lm-eval", "llama-cpp-python", "transformers", "gguf", "pytest"):
        assert package in installed, package


def test_ci_installs_the_browser_checks_the_wheel_then_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    browser = ("command -v chromium-headless-shell >/dev/null || { apt-get update && "
               "apt-get install -y --no-install-recommends chromium-headless-shell; } || echo \"could not install "
               "chromium-headless-shell: the browser tests will skip, saying so\"")
    assert ci_lines == [browser, "bash .ci/wheel-check", _readme_commands()[1]]


def test_the_python_api_exports_every_command():
    import gptforge
    import gptforge.generation  # noqa: F401  importing submodules must not replace the functions
    import gptforge.training.trainer  # noqa: F401
    from gptforge.generation.api import generate as generate_function
    for name in gptforge.__all__:
        assert getattr(gptforge, name) is not None, name
    assert gptforge.generate is generate_function


def test_train_is_the_function_whatever_was_imported_first():
    """Functions are verbs and packages nouns: importing `gptforge.training` (or any of its modules) before or
    after `from gptforge import train` never turns `gptforge.train` into a module."""
    import gptforge
    import gptforge.training
    import gptforge.training.trainer as trainer
    from gptforge import train

    assert train is trainer.train and gptforge.train is trainer.train
    assert not isinstance(train, types.ModuleType) and callable(train)
    assert gptforge.training.train is trainer.train and gptforge.training.Trainer is trainer.Trainer
