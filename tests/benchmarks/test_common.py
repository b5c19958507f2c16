"""benchmarks/common.py: variants, the record, the table, the workload, the agreement metric, the
command line and the run around a measurement."""

import argparse
import json
import sys
import textwrap

import pytest
import torch

from benchmarks import common
from benchmarks.common import Variant, agreement, format_table, parse_variants, ratio_to_first_variant


def test_variants_split_into_environment_engine_and_sampling_settings():
    text = ('base:, nofused:MINIVLLM_FUSED_OPS=0 , fp8:kv_cache_dtype=fp8 enforce_eager=true,'
            'spec:speculative_config={"method": "ngram", "num_speculative_tokens": 4} sampling.top_k=5')
    base, nofused, fp8, spec = parse_variants(text)
    assert base == Variant("base")
    assert nofused == Variant("nofused", env={"MINIVLLM_FUSED_OPS": "0"})
    assert fp8.engine == {"kv_cache_dtype": "fp8", "enforce_eager": True} and not fp8.env
    # JSON values keep their commas and spaces; sampling.* goes to SamplingParams.
    assert spec.engine == {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}
    assert spec.sampling == {"top_k": 5}
    assert parse_variants(None) == [] and parse_variants("") == []


@pytest.mark.parametrize("text", ["base", "a:,a:x=1", "a:novalue", "bad name:x=1"])
def test_bad_variants_are_refused(text):
    with pytest.raises(SystemExit, match="--variants"):
        parse_variants(text)


def test_each_variant_runs_in_a_child_with_its_environment(tmp_path):
    """run_variants starts the script once per variant with --child-variant and its environment,
    and gathers the children's rows; a child that fails leaves a row that says so."""
    script = tmp_path / "bench.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        argv = sys.argv[1:]
        name, out = argv[argv.index("--child-variant") + 1], argv[-1]
        if os.environ.get("FAIL") == "1":
            sys.exit(3)
        json.dump({"results": [{"variant": name, "switch": os.environ.get("SWITCH"),
                                "cache": argv[argv.index("--model-cache") + 1]}],
                   "copy_bandwidth_bytes_per_s": 5.0}, open(out, "w"))
    """))

    class Args:
        variants, model, model_cache = "on:SWITCH=1,off:SWITCH=0,broken:FAIL=1", None, tmp_path

    record = {"results": [], "variants": []}
    common.run_variants(script, ["--some-flag"], Args, record, tmp_path / "out.json")
    assert record["results"][:2] == [{"variant": "on", "switch": "1", "cache": str(tmp_path)},
                                     {"variant": "off", "switch": "0", "cache": str(tmp_path)}]
    assert record["results"][2] == {"variant": "broken", "error": "child exited with 3"}
    assert [v["name"] for v in record["variants"]] == ["on", "off", "broken"]
    assert record["copy_bandwidth_bytes_per_s"] == 5.0
    assert json.loads((tmp_path / "out.json").read_text()) == record


def test_ratio_to_the_first_variant_matches_rows_by_key():
    rows = [{"variant": "a", "batch": 1, "t": 2.0}, {"variant": "a", "batch": 8, "t": 4.0},
            {"variant": "b", "batch": 1, "t": 3.0}, {"variant": "b", "batch": 8, "t": 2.0},
            {"variant": "b", "batch": 64, "t": 1.0}, {"variant": "c", "error": "child exited with 1"}]
    ratio_to_first_variant(rows, lambda r: r["batch"], "t")
    assert [r.get("t_vs_a") for r in rows] == [1.0, 1.0, 1.5, 0.5, None, None]
    alone = [{"variant": "base", "batch": 1, "t": 2.0}]
    ratio_to_first_variant(alone, lambda r: r["batch"], "t")
    assert "t_vs_base" not in alone[0]  # one variant: nothing to compare


def test_table_formats_drops_empty_columns_and_marks_missing_values():
    rows = [{"name": "x", "ms": 1.23456, "note": None}, {"name": "longer", "ms": None, "note": None}]
    lines = format_table(rows, [("name", "name", ""), ("ms", "ms", ".2f"), ("note", "note", ""),
                                ("double", lambda r: r["ms"] and 2 * r["ms"], ".1f")]).splitlines()
    assert lines[0].split() == ["name", "ms", "double"]  # "note" has no value at all
    assert lines[2].split() == ["x", "1.23", "2.5"] and lines[3].split() == ["longer", "-", "-"]
    assert lines[2].index("1.23") + 4 == lines[0].index("ms") + 2  # numbers right-aligned


def test_agreement_counts_rows_prefixes_and_first_tokens():
    got = agreement([[1, 2, 3], [4, 5, 6, 7], [9]], [[1, 2, 9], [4, 5, 6, 7], [8]])
    assert got["exact"] == pytest.approx(1 / 3) and got["first_token"] == pytest.approx(2 / 3)
    assert got["common_prefix_lengths"] == [2, 4, 0]
    assert got["prefix"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # each row over its own length


def test_random_requests_are_seeded_and_in_range():
    prompts, out_lens = common.random_requests(50, (3, 9), (2, 4), vocab=100, seed=7)
    assert (prompts, out_lens) == common.random_requests(50, (3, 9), (2, 4), vocab=100, seed=7)
    assert all(3 <= len(p) <= 9 and min(p) >= 10 and max(p) < 100 for p in prompts)
    assert set(out_lens) == {2, 3, 4}


@pytest.mark.parametrize("text", ["9:3", "0", "a:b", "1:2:3"])
def test_ranges_are_checked(text):
    with pytest.raises(SystemExit, match="--input-len"):
        common.parse_range(text, "--input-len")


def test_the_record_names_device_versions_and_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/roofline.py", "--steps", "2"])
    args = argparse.Namespace(steps=2, out=common.ROOT / "x.json")
    record = common.new_record("roofline", torch.device("cpu"), args)
    env = record["environment"]
    assert env["device"].startswith("cpu") and env["torch"] == torch.__version__
    assert env["command"] == "python benchmarks/roofline.py --steps 2" and env["date"][:2] == "20"
    assert {"python", "triton", "transformers", "cuda", "git_commit"} <= set(env)
    assert record["args"] == {"steps": 2, "out": str(common.ROOT / "x.json")}
    assert record["results"] == [] and "no GPU claim" in record["note"]
    assert common.default_out("roofline", "tiny", torch.device("cpu")).parent == common.CPU_RESULTS_DIR


def test_names_are_distinct_known_names_and_a_dict_maps_them():
    parse = common.names(("a", "b", "c"), "--things")
    assert parse(" a, c ") == ["a", "c"]
    assert common.names({"x": 1, "y": 2}, "--xy")("y,x") == [2, 1]
    for text in ("a,d", "a,a", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="--things"):
            parse(text)


def test_defaults_follow_the_device_and_go_through_the_options_type():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", type=lambda text: common.int_list(text, "--sizes"))
    args = common.with_device_defaults(parser, ["--device", "cpu"], gpu={"sizes": "1,64"}, cpu={"sizes": "1,4"})
    assert args.sizes == [1, 4]  # the CPU's, parsed as the command line would be
    given = common.with_device_defaults(parser, ["--device", "cpu", "--sizes", "2"], {"sizes": "1"}, {"sizes": "1"})
    assert given.sizes == [2]


def test_a_row_is_written_at_once_and_printed_as_a_line_of_its_table(tmp_path, capsys):
    record = {"results": []}
    common.add_row(record, tmp_path / "r.json", {"ms": 1.5}, [("ms", "ms", ".1f")])
    assert json.loads((tmp_path / "r.json").read_text()) == {"results": [{"ms": 1.5}]}
    assert capsys.readouterr().out.split() == ["1.5"]


def test_finish_reports_failed_children_and_says_nothing_in_a_child(tmp_path, capsys):
    record = {"args": {"child_variant": None}, "note": "a note",
              "results": [{"variant": "a", "ms": 1.0}, {"variant": "b", "error": "child exited with 3"}]}
    common.finish(tmp_path / "r.json", record, "TABLE", "a line")
    assert capsys.readouterr().out.splitlines()[2:] == ["TABLE", "a line", "variant b: child exited with 3", "a note"]
    child = {**record, "args": {"child_variant": "a"}}
    common.finish(tmp_path / "c.json", child, "TABLE")
    assert capsys.readouterr().out == "" and json.loads((tmp_path / "c.json").read_text()) == child
