"""Mechanisms from outside the package: a .py file and an installed distribution run
through every command; broken and clashing plugins are refused naming them."""

import json
import re
import subprocess
import sys
import textwrap

import pytest

from attnbench.measure import closed_form_macs

from conftest import FILE_PLUGIN, ROOT, bench

PLUGIN = ["--plugin", str(FILE_PLUGIN)]




def test_both_plugins_show_in_bench_list():
    result = bench("list", *PLUGIN)
    assert result.exit_code == 0, result.output
    assert re.search(r"│ pooled\s", result.output) and re.search(r"│ linear\s", result.output)
    assert "attnbench_linear.linear" in result.output  # where the installed one comes from


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugins") / "res"
    result = bench("run", "-r", "32", "-r", "64", "--dim", "16", "--budget", "0.02", "--device", "cpu",
                   "-m", "full,linear,pooled:pool=2", *PLUGIN, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_plugins_run_through_bench_run_with_every_column_filled(plugin_run):
    records = [json.loads(line) for line in (plugin_run / "results.jsonl").read_text().splitlines()]
    mine = [r for r in records if r["mechanism"] in ("linear", "pooled")]
    assert len(mine) == 4 and all(r["status"] == "ok" for r in mine)
    for r in mine:
        for field in ("macs", "latency_ms", "latency_iqr_ms", "peak_mem_mb", "gflops", "gemm_fraction", "runs"):
            assert r[field] is not None, (r["label"], field)
        expected = closed_form_macs(r["label"], r["batch"], r["height"], r["width"], r["dim"], r["heads"])
        assert r["macs"] == expected, r["label"]
    config = json.loads((plugin_run / "config.json").read_text())
    assert config["plugins"] == [str(FILE_PLUGIN)]
    assert "pooled:pool=2" in (plugin_run / "summary.md").read_text()


@pytest.mark.slow
def test_a_resume_of_a_plugin_run_needs_the_plugin(plugin_run, tmp_path):
    result = bench("run", "-r", "32", "-r", "64", "--dim", "16", "--budget", "0.02", "--device", "cpu",
                   "-m", "full,linear,pooled:pool=2", *PLUGIN, "--out", plugin_run, "--resume")
    assert result.exit_code == 0 and "6 cases (6 already done)" in result.output


def test_plugins_draw_in_bench_viz(tmp_path):
    result = bench("viz", "-m", "linear", "-m", "pooled", *PLUGIN, "--resolution", "256", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "attention_maps.png").stat().st_size > 10_000


@pytest.mark.parametrize("spec", ["pooled", "linear"])
def test_plugins_profile(spec):
    result = bench("profile", spec, *PLUGIN, "--resolution", "128", "--dim", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "ms per call" in result.output and "other" in result.output


def test_a_plugin_given_as_a_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_module_plugin.py").write_text(FILE_PLUGIN.read_text().replace('"pooled"', '"pooled_by_module"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = bench("list", "--plugin", "my_module_plugin")
    assert result.exit_code == 0 and "pooled_by_module" in result.output


def test_a_plugin_that_fails_to_import_is_named(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import no_such_package_anywhere\n")
    for command in (["list"], ["run", "-m", "full", "-r", "32", "--out", tmp_path / "o"], ["profile", "full"],
                    ["viz", "-m", "full", "--out", tmp_path / "v"]):
        result = bench(*command, "--plugin", broken)
        assert result.exit_code == 2, result.output
        assert "broken_plugin.py" in result.output and "no_such_package_anywhere" in result.output
    result = bench("list", "--plugin", tmp_path / "missing.py")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = bench("list", "--plugin", "no_such_module_anywhere")
    assert result.exit_code == 2 and "no_such_module_anywhere" in result.output


def test_two_plugins_claiming_one_name_are_refused_naming_both(tmp_path):
    clash = tmp_path / "clash.py"
    clash.write_text(FILE_PLUGIN.read_text())  # registers "pooled" again
    result = bench("list", "--plugin", clash)
    assert result.exit_code == 2, result.output
    flat = result.output.replace("\n", "")
    assert "'pooled' is registered twice" in flat and "my_attention.py" in flat and "clash.py" in flat
    builtin = tmp_path / "not_full.py"
    builtin.write_text(FILE_PLUGIN.read_text().replace('"pooled"', '"full"'))
    result = bench("list", "--plugin", builtin)
    flat = result.output.replace("\n", "")
    assert result.exit_code == 2 and "attnbench.attention.full" in flat and "not_full.py" in flat


def test_plugins_loaded_inside_the_block_are_forgotten_after_it(tmp_path, monkeypatch):
    from attnbench.attention import attention_info, list_attentions, load_plugins
    from attnbench.attention.plugins import plugins_forgotten_after

    plugin = tmp_path / "for_a_while.py"
    plugin.write_text(FILE_PLUGIN.read_text().replace('"pooled"', '"pooled_for_a_while"'))
    module = FILE_PLUGIN.read_text().replace('"pooled"', '"pooled_by_module_for_a_while"')
    (tmp_path / "for_a_while_module.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = [i.name for i in list_attentions()]
    for _ in range(2):  # the second time loads both afresh: nothing of the first is left to clash with, or to stand in
        with plugins_forgotten_after():
            load_plugins([str(plugin), "for_a_while_module"])
            assert "for_a_while.py" in attention_info("pooled_for_a_while").source
            assert "for_a_while_module" in attention_info("pooled_by_module_for_a_while").source
            name = next(m for m in sys.modules if m.startswith("attnbench_plugin_for_a_while"))
        assert [i.name for i in list_attentions()] == before
        assert name not in sys.modules and "for_a_while_module" not in sys.modules
        for mechanism in ("pooled_for_a_while", "pooled_by_module_for_a_while"):
            with pytest.raises(ValueError, match=mechanism):
                attention_info(mechanism)


def test_the_public_api_is_importable_from_attnbench():
    import attnbench

    for name in ("AttentionBase", "AttentionMap", "Mark", "Param", "Shape", "register_attention", "build_attention"):
        assert getattr(attnbench, name) is not None
    with pytest.raises(AttributeError):
        attnbench.no_such_name  # noqa: B018


def test_the_example_distribution_declares_its_entry_point():
    text = (ROOT / "examples" / "attnbench-linear" / "pyproject.toml").read_text()
    assert '[project.entry-points."attnbench.attentions"]' in text
    from importlib.metadata import entry_points

    assert "attnbench_linear.linear" in {ep.value for ep in entry_points(group="attnbench.attentions")}


# -- the layers know no mechanism by name ------------------------------------------------------------


def test_no_module_in_measure_or_report_names_a_mechanism():
    from attnbench import list_attentions

    names = [info.name for info in list_attentions()]
    pattern = re.compile(r"""["'](%s)(:[^"']*)?["']""" % "|".join(map(re.escape, names)))
    found = []
    for folder in ("measure", "report"):
        for path in sorted((ROOT / "attnbench" / folder).glob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_compare_and_plot_never_import_torch(tmp_path):
    """The result schema, the reports and the perf gate read results without torch."""
    src = ROOT / "results" / "baselines" / "cpu-ci"
    script = textwrap.dedent(f"""
        import shutil, sys
        from typer.testing import CliRunner
        from attnbench.cli import app
        shutil.copytree({str(src)!r}, {str(tmp_path / 'copy')!r})
        r = CliRunner().invoke(app, ["compare", {str(src)!r}, {str(src)!r}])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(app, ["plot", {str(tmp_path / 'copy')!r}])
        assert r.exit_code == 0, r.output
        print("torch imported:", "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch imported: False" in out.stdout
