"""The README is executable documentation: its quick start runs, and CI runs its test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in _blocks("bash")]
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_commands[0] in ci


def test_readme_demo_command_names_an_existing_script():
    commands = [b.strip() for b in _blocks("bash")]
    demo = [c for c in commands if "pytest" not in c]
    assert demo, "the README must give a demo command"
    scripts = re.findall(r"python (\S+\.py)", demo[0])
    assert scripts and all((ROOT / s).is_file() for s in scripts), scripts


def test_quick_start_runs(capsys):
    code = _blocks("python")[0]
    namespace = {"__name__": "readme_quickstart"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "chain(scale_by_adam(" in out
    params, loss = namespace["params"], namespace["loss"]
    assert float(loss(params)) < 1e-3, out
    assert namespace["tx"] == namespace["gradtx"].adamw(1e-2), "the README says they are equal"
