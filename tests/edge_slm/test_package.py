"""Model packages: open and verify on the device; refuse anything corrupt, foreign or unsafe."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm.errors import ModelError
from edge_slm.package import (
    MANIFEST_FILE,
    MODEL_FILE,
    TASKS,
    ModelPackage,
    sha256_file,
    validate_manifest,
    write_package,
)
from edge_slm.tasks import load_task


def read_manifest(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST_FILE).read_text(encoding="utf-8"))


def write_manifest(pkg: Path, data: dict) -> None:
    (pkg / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")


def valid_manifest(**over) -> dict:
    data = {
        "schema_version": 1,
        "name": "m",
        "version": "1.0.0",
        "task": "text-classification",
        "created": "2026-01-01T00:00:00+00:00",
        "sha256": "0" * 64,
        "inputs": [{"name": "ids", "dtype": "int32", "shape": [1, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 3]}],
    }
    data.update(over)
    return data


def test_real_package_opens_and_exposes_identity_labels_tokenizer(text_model):
    pkg = ModelPackage.open(text_model.package)
    assert pkg.path == Path(text_model.package)
    assert pkg.task == "text-classification"
    assert pkg.labels == text_model.labels
    assert pkg.tokenizer_path is not None and pkg.tokenizer_path.name == "tokenizer.json"
    assert pkg.model_path.is_file()
    ident = pkg.identity()
    assert ident == {"name": "intents", "version": pkg.version, "sha256": sha256_file(pkg.model_path)}
    assert pkg.preprocessing["max_length"] == pkg.manifest["inputs"][0]["shape"][-1]
    pkg.preprocessing["max_length"] = -1  # a copy: callers cannot edit the manifest through it
    assert pkg.preprocessing["max_length"] != -1


def test_labels_fall_back_to_labels_txt(package_copy, text_model):
    data = read_manifest(package_copy)
    del data["labels"]
    write_manifest(package_copy, data)
    (package_copy / "labels.txt").write_text("\n".join(text_model.labels) + "\n\n", encoding="utf-8")
    assert ModelPackage.open(package_copy).labels == text_model.labels


def test_flipped_byte_in_model_is_refused_naming_sha256(package_copy):
    model = package_copy / MODEL_FILE
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    model.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="sha256") as err:
        ModelPackage.open(package_copy)
    assert "corrupt" in str(err.value)
    # verify=False is the explicit escape hatch and must skip only the hash check
    assert ModelPackage.open(package_copy, verify=False).task == "text-classification"


def test_schema_version_2_is_refused(package_copy):
    data = read_manifest(package_copy)
    data["schema_version"] = 2
    write_manifest(package_copy, data)
    with pytest.raises(ModelError, match="schema_version 2 is not supported"):
        ModelPackage.open(package_copy)


def test_manifest_inputs_that_disagree_with_model_fail_load_task(package_copy):
    data = read_manifest(package_copy)
    real = list(data["inputs"][0]["shape"])
    data["inputs"][0]["shape"] = [1, real[-1] + 1]
    write_manifest(package_copy, data)
    pkg = ModelPackage.open(package_copy)  # the manifest itself is well-formed
    with pytest.raises(ModelError, match="manifest inputs") as err:
        load_task(pkg)
    assert str(real) in str(err.value)


def test_manifest_output_dtype_that_disagrees_with_model_fails_load_task(package_copy):
    data = read_manifest(package_copy)
    data["outputs"][0]["dtype"] = "int8"
    write_manifest(package_copy, data)
    with pytest.raises(ModelError, match="manifest outputs"):
        load_task(ModelPackage.open(package_copy))


def test_real_package_loads_as_a_task_and_classifies(text_model):
    task = load_task(ModelPackage.open(text_model.package))
    out = task(text_model.test_texts[0])
    assert out["label"] in text_model.labels and 0.0 <= out["score"] <= 1.0


def test_missing_manifest_or_model_or_dir(package_copy, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        ModelPackage.open(tmp_path / "nothing-here")
    (package_copy / MODEL_FILE).unlink()
    with pytest.raises(ModelError, match="no model.tflite"):
        ModelPackage.open(package_copy)
    (package_copy / MANIFEST_FILE).unlink()
    with pytest.raises(ModelError, match="no manifest.json"):
        ModelPackage.open(package_copy)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe{}", b"[1, 2]", b"null"])
def test_non_json_or_non_object_manifest_is_a_model_error(package_copy, content):
    (package_copy / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(ModelError) as err:
        ModelPackage.open(package_copy)
    assert MANIFEST_FILE in str(err.value)


def _tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def test_tar_gz_package_opens_after_unpacking_next_to_it(text_model, tmp_path):
    src = Path(text_model.package)
    members = {f"intents/{f.name}": f.read_bytes() for f in src.iterdir()}
    pkg = ModelPackage.open(_tar(tmp_path / "intents.tar.gz", members))
    assert pkg.path == tmp_path / "intents" and pkg.sha256 == sha256_file(src / MODEL_FILE)


@pytest.mark.parametrize(
    ("name", "symlink"),
    [("pkg/../../escaped.txt", None), ("/tmp/abs-escaped.txt", None), ("pkg/../escaped.txt", None), (None, "pkg/link")],
)
def test_tar_gz_with_unsafe_member_is_refused_and_nothing_is_written(tmp_path, name, symlink):
    inner = tmp_path / "inner"
    inner.mkdir()
    members = {"pkg/manifest.json": b"{}"}
    if name:
        members[name] = b"pwned"
    archive = _tar(inner / "pkg.tar.gz", members, symlink)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ModelError, match="unsafe archive member"):
        ModelPackage.open(archive)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/abs-escaped.txt").exists()


def test_write_package_round_trips_and_computes_sha(tmp_path):
    model = b"\x1c\x00\x00\x00TFL3" + bytes(range(50))
    pkg = write_package(tmp_path / "out" / "pkg", model, valid_manifest(sha256="bogus"), {"labels.txt": b"a\nb\nc\n"})
    assert pkg.sha256 == sha256_file(pkg.model_path) and pkg.manifest["size_bytes"] == len(model)
    assert pkg.labels == ["a", "b", "c"]
    # overwriting an existing package swaps it whole and leaves no hidden leftovers
    pkg2 = write_package(tmp_path / "out" / "pkg", model + b"x", valid_manifest(version="2.0.0"))
    assert pkg2.version == "2.0.0" and not (pkg2.path / "labels.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pkg"]


def test_write_package_with_invalid_manifest_leaves_nothing_behind(tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(ModelError, match="task"):
        write_package(parent / "pkg", b"model", valid_manifest(task="translation"))
    assert list(parent.iterdir()) == []


def test_write_package_failing_midway_keeps_old_package_and_removes_temp(tmp_path):
    dest = tmp_path / "pkg"
    old = write_package(dest, b"old-model", valid_manifest())
    with pytest.raises(OSError):
        write_package(dest, b"new-model", valid_manifest(), {"no/such/dir.txt": b"x"})
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    assert ModelPackage.open(dest).sha256 == old.sha256


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"schema_version": True}, "schema_version"),
        ({"schema_version": "1"}, "schema_version"),
        ({"name": 3}, "'name' must be a string"),
        ({"inputs": {}}, "'inputs' must be a list"),
        ({"task": "translation"}, "task 'translation'"),
        ({"inputs": [{"name": "x", "dtype": "int32"}]}, "inputs[0] needs name, dtype and shape"),
        ({"outputs": [{"name": "x", "dtype": "f", "shape": [1, "3"]}]}, "outputs[0].shape"),
        ({"labels": ["a", 1]}, "labels"),
        ({"labels": "a,b"}, "'labels' must be a list"),
        ({"sha256": "A" * 64}, "sha256"),
        ({"sha256": "0" * 63}, "sha256"),
        ({"size_bytes": "12"}, "size_bytes"),
    ],
)
def test_validate_manifest_names_the_bad_key(over, fragment):
    with pytest.raises(ModelError) as err:
        validate_manifest(valid_manifest(**over), "m.json")
    assert fragment in str(err.value) and str(err.value).startswith("m.json: ")


def test_validate_manifest_names_missing_key():
    data = valid_manifest()
    del data["created"]
    with pytest.raises(ModelError, match="missing key 'created'"):
        validate_manifest(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
FIELDS = list(valid_manifest()) + ["labels", "preprocessing", "size_bytes", "source"]


@st.composite
def mutated_manifests(draw):
    """A valid manifest with a few keys replaced by arbitrary JSON or removed: reaches the deep checks."""
    data = valid_manifest(labels=["a", "b", "c"])
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(JSON | st.sampled_from(TASKS) | st.just("0" * 64))
    return data


@settings(max_examples=200, deadline=None)
@given(JSON | mutated_manifests())
def test_validate_manifest_on_arbitrary_json_only_raises_model_error(data):
    data = json.loads(json.dumps(data))  # exactly what a manifest read from disk can hold
    try:
        out = validate_manifest(data, "fuzz.json")
    except ModelError as exc:
        assert str(exc).startswith("fuzz.json: ")
    else:
        assert out["schema_version"] == 1 and out["task"] in TASKS
        assert all(isinstance(d, int) for t in out["inputs"] + out["outputs"] for d in t["shape"])
        assert len(out["sha256"]) == 64
