"""The README and docs/ hold together: every relative link resolves, docs/commands.md is the
command line as it is (`python tests/e2e/test_docs.py` writes it again), the README stays a front
page, and the Python examples of docs/ run (the README's: tests/e2e/test_readme.py)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "results").glob("**/README.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def command_pages() -> dict[str, str]:
    """docs/commands.md (an index) and docs/commands/NAME.md for each command, from the command
    line itself: each command's help and options."""
    import typer

    from attnbench.cli import app

    group = typer.main.get_command(app)
    index = ["# Commands", "", "A page per `bench` command, with its options as `bench COMMAND --help` gives them. "
             "These pages are generated from the command line (`python tests/e2e/test_docs.py`); a test keeps them "
             "current.", ""]
    pages = {}
    for name in sorted(group.commands):
        command = group.commands[name]
        about = " ".join((command.help or "").split())
        index.append(f"- [`bench {name}`](commands/{name}.md): {about.split('. ')[0].rstrip('.')}.")
        lines = [f"# `bench {name}`", "", about, "", "| option | meaning | default |", "|---|---|---|"]
        for param in command.params:
            if param.name == "help":
                continue
            flags = ", ".join(f"`{o}`" for o in param.opts) if param.param_type_name == "option" else f"`{param.name.upper()}`"
            default = "" if param.default in (None, False, [], ()) or param.required else f"`{param.default}`"
            text = " ".join((getattr(param, "help", "") or "").split()).replace("|", "\\|")
            lines.append(f"| {flags} | {text} | {default} |")
        pages[f"commands/{name}.md"] = "\n".join(lines + ["", "[All commands](../commands.md)", ""])
    pages["commands.md"] = "\n".join(index + [""])
    return pages


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    linked = set(re.findall(r"\(docs/([a-z-]+\.md)\)", text))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}  # every page reachable from the front page


def test_the_command_pages_are_current():
    for page, text in command_pages().items():
        assert (ROOT / "docs" / page).read_text() == text, f"docs/{page} is stale: run python tests/e2e/test_docs.py"


BLOCKS = [(page, b) for page in sorted((ROOT / "docs").glob("*.md"))
          for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S) if "..." not in b]


@pytest.mark.slow
@pytest.mark.parametrize("page, code", BLOCKS, ids=[f"{p.name}:{b.splitlines()[0][:30]}" for p, b in BLOCKS])
def test_a_docs_example_runs_as_a_script(page, code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code.replace("resolution=1024", "resolution=64"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


if __name__ == "__main__":
    (ROOT / "docs" / "commands").mkdir(exist_ok=True)
    for page, text in command_pages().items():
        (ROOT / "docs" / page).write_text(text)


def test_the_report_package_imports_no_torch():
    """report/ turns records into tables and figures and computes nothing else: importing all
    of it leaves torch unimported (maps are computed in attnbench.maps, tokens in attnbench.content)."""
    names = sorted(p.stem for p in (ROOT / "attnbench" / "report").glob("*.py") if p.stem != "__init__")
    code = "import sys\n" + "".join(f"import attnbench.report.{n}\n" for n in names) + "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False" and len(names) >= 6


def _module_imports(anywhere: bool = False) -> dict[str, set[str]]:
    """Each attnbench module's top-level imports (``anywhere``: in functions too) of other
    attnbench modules, its own parent packages left out (they run first)."""
    import ast

    mods = {}
    for path in (ROOT / "attnbench").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree) if anywhere else tree.body:
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_circles():
    """No attnbench module imports, at its top, one that imports it back (directly or around a
    circle); the registries import nothing that registers in them (model files and plugins
    register themselves)."""
    graph = _module_imports()
    circles = []

    def walk(node: str, path: list[str]) -> None:
        for dep in graph[node]:
            if dep in path:
                circles.append(path[path.index(dep):] + [dep])
            elif len(path) < 40:
                walk(dep, path + [dep])

    for name in graph:
        walk(name, [name])
    assert circles == []
    everywhere = _module_imports(anywhere=True)
    assert not everywhere["attnbench.attention.registry"] & {"attnbench.attention.plugins"}
    assert not everywhere["attnbench.backbones.registry"] & {f"attnbench.backbones.{m}" for m in ("biformer", "stl", "swin")}


def test_dependencies_run_one_way():
    """The mechanisms know nothing of measuring; measuring knows nothing of the sweep, the
    reports or the command line (in function bodies too)."""
    everywhere = _module_imports(anywhere=True)
    above = {"attention": ("measure", "sweep", "report", "executors", "cli"),
             "measure": ("sweep", "report", "executors", "cli")}
    wrong = {(name, dep) for name, deps in everywhere.items() for layer, banned in above.items()
             if name.startswith(f"attnbench.{layer}") for dep in deps
             if any(dep == f"attnbench.{b}" or dep.startswith(f"attnbench.{b}.") for b in banned)}
    assert wrong == set()
    assert any(n.startswith("attnbench.measure.") for n in everywhere)


def test_the_code_passes_ruff():
    """The lint rules of pyproject.toml ([tool.ruff]) hold for the package, tests, benchmarks and examples."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "attnbench", "tests", "benchmarks", "examples",
                           "bench.py"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
