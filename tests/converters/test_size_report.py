"""The size/latency/accuracy report: real converted candidates, report files, Pareto front, chosen model."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from edge_slm.errors import ConfigError

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def report_dir(sensor_model, tmp_path_factory):  # noqa: ANN001, ANN201
    """Teacher (the sensor Conv1D) converted with every recipe, plus a channel-pruned student."""
    from converters.convert import convert_model
    from converters.prune import PrunePlan, prune
    from converters.size_report import (
        Candidate,
        build_report,
        candidates_from_conversion,
        write_report,
    )
    from converters.tf_env import tf

    work = tmp_path_factory.mktemp("size_report")
    result = convert_model(sensor_model.keras_path, work / "pkg", calib=sensor_model.calib, eval_data=sensor_model.eval,
                           quantize="auto", task="sensor-classification", labels=["a", "b", "c"], progress=False)
    model = tf().keras.models.load_model(sensor_model.keras_path, compile=False)
    ev = np.load(sensor_model.eval)
    pruned = prune(model, PrunePlan(channels=0.75), score="magnitude")
    pruned_path = work / "pruned.keras"
    pruned.save(pruned_path)
    calib = np.load(sensor_model.calib)["x"]
    cands = [Candidate("teacher", sensor_model.keras_path, "float32"),
             *candidates_from_conversion("teacher", sensor_model.keras_path, result),
             Candidate("pruned", pruned_path, "dynamic")]
    rep = build_report(cands, calib=calib, eval_data=(ev["x"], ev["y"]), teacher="teacher", runs=50)
    write_report(rep, work / "out")
    return work / "out", rep, result


def test_report_files_and_rows(report_dir) -> None:  # noqa: ANN001
    out, rep, result = report_dir
    on_disk = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in on_disk["candidates"]]
    converted = [a.recipe for a in result.attempts if a.model_bytes and not a.error]
    assert names == ["teacher", *[f"teacher/{r}" for r in converted], "pruned"]
    assert len(converted) >= 2
    for r in on_disk["candidates"]:
        assert r["size_bytes"] > 0 and r["latency_ms_p50"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["params"] > 0 and r["keras_path"].endswith(".keras")
    rows = {r["name"]: r for r in on_disk["candidates"]}
    assert rows["teacher"]["accuracy_vs_teacher"] == 0.0
    assert rows["pruned"]["params"] < rows["teacher"]["params"]
    # the converted attempts' bytes are what was measured: sizes match convert_model's
    for a in result.attempts:
        if a.model_bytes and not a.error:
            assert rows[f"teacher/{a.recipe}"]["size_bytes"] == a.size_bytes
    md = (out / "report.md").read_text()
    assert "| model |" in md and "TFLite KiB" in md and all(n in md for n in names)
    assert on_disk["machine"]["cores"] >= 1


def test_pareto_front_is_the_non_dominated_set(report_dir) -> None:  # noqa: ANN001
    _, rep, _ = report_dir
    rows = rep["candidates"]

    def dominated(r: dict) -> bool:
        return any(o["size_bytes"] <= r["size_bytes"] and o["accuracy"] >= r["accuracy"]
                   and (o["size_bytes"], o["accuracy"]) != (r["size_bytes"], r["accuracy"]) for o in rows)

    assert set(rep["pareto"]) == {r["name"] for r in rows if not dominated(r)}
    assert rep["pareto"]
    sizes = [next(r["size_bytes"] for r in rows if r["name"] == n) for n in rep["pareto"]]
    assert sizes == sorted(sizes)


def test_svg_has_one_point_per_candidate_and_a_pareto_path(report_dir) -> None:  # noqa: ANN001
    out, rep, _ = report_dir
    root = ET.parse(out / "tradeoff.svg").getroot()
    assert root.tag == f"{SVG}svg"
    panels = [g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"]
    assert len(panels) == 2
    for panel in panels:
        points = [c for c in panel.iter(f"{SVG}circle") if c.get("class") == "point"]
        assert sorted(c.get("data-name") for c in points) == sorted(r["name"] for r in rep["candidates"])
    size_panel = panels[0]
    (path,) = [p for p in size_panel.iter(f"{SVG}polyline") if p.get("class") == "pareto"]
    coords = path.get("points").split()
    assert len(coords) == len(rep["pareto"])
    # the path runs through the front's points
    by_name = {c.get("data-name"): f"{c.get('cx')},{c.get('cy')}" for c in size_panel.iter(f"{SVG}circle")
               if c.get("class") == "point"}
    assert coords == [by_name[n] for n in rep["pareto"]]
    labels = [t.text for t in size_panel.iter(f"{SVG}text") if t.get("class") == "label"]
    assert sorted(labels) == sorted(r["name"] for r in rep["candidates"])


def test_chosen_under_constraints(report_dir) -> None:  # noqa: ANN001
    from converters.size_report import choose, convert_command, format_table

    _, rep, _ = report_dir
    rows = rep["candidates"]
    sizes = sorted(r["size_bytes"] for r in rows)
    limit_kib = (sizes[len(sizes) // 2]) / 1024  # about half the candidates fit
    fits = [r for r in rows if r["size_bytes"] / 1024 <= limit_kib]
    best = max(r["accuracy"] for r in fits)
    got = choose(rows, max_kib=limit_kib)
    assert got in fits and got["accuracy"] == best
    floor = min(r["accuracy"] for r in rows)
    smallest = choose(rows, min_accuracy=floor)
    assert smallest["size_bytes"] == sizes[0]
    assert choose(rows, max_kib=sizes[0] / 1024 / 2) is None
    cmd = convert_command(got)
    assert cmd.startswith(f"edge-slm convert {got['keras_path']} ") and f"--quantize {got['recipe']}" in cmd
    table = format_table(rep | {"chosen": got["name"], "convert_command": cmd})
    assert got["name"] in table and cmd in table and "p50 ms" in table
    nothing = format_table(rep | {"chosen": None, "convert_command": None,
                                  "constraint": {"max_kib": 0.1, "min_accuracy": None}})
    assert "no candidate meets max KiB 0.1" in nothing


def test_cli_writes_report_and_names_the_chosen(sensor_model, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from converters.size_report import main

    out = tmp_path / "rep"
    assert main(["--report", str(out), "--candidate", f"sensor={sensor_model.keras_path}", "--recipes",
                 "float32,dynamic", "--calib", str(sensor_model.calib), "--eval", str(sensor_model.eval),
                 "--teacher", "sensor", "--max-kib", "1000", "--runs", "20"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in rep["candidates"]] == ["sensor/float32", "sensor/dynamic"]
    assert rep["teacher"] == "sensor/float32"
    assert rep["chosen"] in ("sensor/float32", "sensor/dynamic")
    chosen = next(r for r in rep["candidates"] if r["name"] == rep["chosen"])
    assert chosen["accuracy"] == max(r["accuracy"] for r in rep["candidates"])
    assert rep["convert_command"] in capsys.readouterr().out
    assert str(sensor_model.keras_path) in rep["convert_command"]


def test_bad_input(sensor_model) -> None:  # noqa: ANN001
    from converters.size_report import Candidate, build_report, main

    c = Candidate("a", sensor_model.keras_path)
    with pytest.raises(ConfigError, match="unique"):
        build_report([c, Candidate("a", sensor_model.keras_path)], calib=None, eval_data=None)
    with pytest.raises(ConfigError, match="not a candidate"):
        build_report([c], calib=None, eval_data=None, teacher="nope")
    with pytest.raises(ConfigError, match="model file not found"):
        build_report([Candidate("b", "/nonexistent/m.keras")], calib=None, eval_data=None)
    with pytest.raises(ConfigError, match="NAME=PATH"):
        main(["--report", "/tmp/x", "--candidate", "no-equals-sign", "--eval", str(sensor_model.eval)])
