"""Signed model updates: every attack is refused with its code, crashes never leave a half model, trials revert."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm import updates
from edge_slm.errors import ConfigError, ModelError, UpdateError
from edge_slm.package import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, ModelPackage
from edge_slm.signing import (
    canonical,
    generate_keypair,
    load_private_key,
    load_public_key,
    pack_package,
    sign_manifest,
)
from edge_slm.tasks import load_task
from edge_slm.updates import (
    COMMIT_STEPS,
    INSTALL_STEPS,
    REVERT_STEPS,
    ROLLBACK_STEPS,
    STEPS,
    ModelStore,
    SimulatedCrash,
    UpdateManifest,
    UpdateReceiver,
    apply_update,
    decode_chunk,
    encode_chunk,
    is_newer,
    split_chunks,
    verify_update,
)
from tests.conftest import ROOT, Collector, run_cli

DEVICE = "dev-upd"
GOLDEN = "turn on the kitchen lights"


# --- helpers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys():
    private_pem, public_pem = generate_keypair()
    return load_private_key(private_pem), load_public_key(public_pem)


@pytest.fixture
def store(text_model, tmp_path) -> ModelStore:
    """A store with the trained intent model 1.0.0 installed and committed."""
    s = ModelStore(tmp_path / "store")
    s.install(text_model.package)
    assert s.installed_version() == "1.0.0" and s.trial() is None
    return s


def make_update(pkg_dir: Path, key, version: str = "1.1.0", *, archive: bytes | None = None,  # noqa: ANN001
                device: str = "*", expires_in: timedelta = timedelta(days=1), golden: str | None = GOLDEN,
                label: str | None = None) -> tuple[dict, bytes]:
    """(signed wrapper, archive) for pkg_dir re-versioned in the archive, as `edge-slm sign` makes them."""
    manifest = json.loads((pkg_dir / MANIFEST_FILE).read_text())
    if archive is None:
        archive = pack_package(pkg_dir, {MANIFEST_FILE: json.dumps({**manifest, "version": version}).encode()})
    m = UpdateManifest.create(manifest["name"], version, archive, device=device, expires_in=expires_in,
                              golden_input=golden, golden_label=label)
    return sign_manifest(m.to_dict(), key), archive


def tar_gz(files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:  # noqa: B006
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def package_files(pkg_dir: Path, version: str = "1.1.0") -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in pkg_dir.iterdir()}
    files[MANIFEST_FILE] = json.dumps({**json.loads(files[MANIFEST_FILE]), "version": version}).encode()
    return files


def listing(store: ModelStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                  if p.name != ".lock" and (p.parent in (store.root, store.versions)))


def assert_consistent(store: ModelStore, versions: set[str]) -> ModelPackage:
    """current loads and answers; nothing half-written or unreferenced is left; links agree with the trial."""
    pkg = store.current_package()  # verifies sha256 and schema
    assert pkg.version in versions
    assert load_task(pkg)(GOLDEN)["label"]
    assert not list(store.root.glob(".tmp-*")) and not list(store.versions.glob(".tmp-*"))
    current = os.readlink(store.root / "current")
    previous = os.readlink(store.root / "previous") if (store.root / "previous").is_symlink() else None
    trial = store.trial()
    if trial is not None:
        assert trial.target == current
    assert previous != current
    if previous is not None:
        ModelPackage.open(store.root / previous)
    referenced = {current, previous, trial.target if trial else None}
    assert {f"versions/{p.name}" for p in store.versions.iterdir()} <= referenced
    return pkg


def refused(code: str, fn, *args, **kw) -> UpdateError:  # noqa: ANN001
    with pytest.raises(UpdateError) as info:
        fn(*args, **kw)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value}"
    assert str(info.value)
    return info.value


# --- versions, signing, archives ---------------------------------------------------------------------
def test_versions_compare_numerically_not_as_text():
    assert is_newer("1.2.10", "1.2.9") and not is_newer("1.2.9", "1.2.10")
    assert not is_newer("1.2", "1.2.0") and not is_newer("1.2.0", "1.2")
    assert is_newer("2", "1.99.99") and is_newer("1.0.0", None)
    assert is_newer("1.0.0", "not-a-version")  # an odd installed version must not block updates forever
    for bad in ("1.2.x", "", "v1", "1..2", "1.2.3-rc1", " 1.2"):
        refused("bad_manifest", updates.parse_version, bad)


def test_pack_package_is_reproducible_and_owner_free(text_model, package_copy):
    a = pack_package(text_model.package)
    os.utime(package_copy / MODEL_FILE, (1, 1))
    assert pack_package(package_copy) == a  # same files, other mtimes and directory name: same bytes
    with tarfile.open(fileobj=io.BytesIO(a), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.isfile() for m in members)
    rooted = pack_package(text_model.package, root="intents-1.0.0")
    with tarfile.open(fileobj=io.BytesIO(rooted), mode="r:gz") as tar:
        assert tar.getnames() == ["intents-1.0.0"] + [f"intents-1.0.0/{m.name}" for m in members]
    (package_copy / "link").symlink_to(package_copy / MODEL_FILE)
    with pytest.raises(ModelError, match="symbolic link"):
        pack_package(package_copy)


def test_signature_covers_canonical_json_only(keys):
    key, pub = keys
    wrapper = sign_manifest({"b": 1, "a": [1, "é"]}, key)
    assert canonical(wrapper["manifest"]) == b'{"a":[1,"\\u00e9"],"b":1}'
    pub.verify(base64.b64decode(wrapper["signature"]), canonical({"a": [1, "é"], "b": 1}))


def test_keys_that_are_not_ed25519_pem_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="keygen"):
        load_public_key(tmp_path / "missing.pub")
    (tmp_path / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="update_key.pub"):
        load_public_key(tmp_path / "junk.pub")
    private_pem, public_pem = generate_keypair()
    with pytest.raises(ConfigError):
        load_private_key(public_pem)
    assert load_public_key(public_pem.decode()) is not None


# --- every attack is refused, the installed model keeps working ---------------------------------------
def _unsigned(w, a, k):  # noqa: ANN001, ANN202
    return {"manifest": w["manifest"]}, a


def _bare_manifest(w, a, k):  # noqa: ANN001, ANN202
    return w["manifest"], a


def _wrong_key(w, a, k):  # noqa: ANN001, ANN202
    other = load_private_key(generate_keypair()[0])
    return sign_manifest(w["manifest"], other), a


def _tampered_version(w, a, k):  # noqa: ANN001, ANN202
    return {**w, "manifest": {**w["manifest"], "version": "9.0.0"}}, a


def _tampered_device(w, a, k):  # noqa: ANN001, ANN202
    return {**w, "manifest": {**w["manifest"], "device": DEVICE}}, a


def _garbage_signature(w, a, k):  # noqa: ANN001, ANN202
    return {**w, "signature": "not base64!"}, a


def _short_signature(w, a, k):  # noqa: ANN001, ANN202
    return {**w, "signature": base64.b64encode(b"x" * 10).decode()}, a


def _wrong_hash(w, a, k):  # noqa: ANN001, ANN202
    flipped = bytearray(a)
    flipped[len(a) // 2] ^= 0xFF
    return w, bytes(flipped)


def _wrong_size(w, a, k):  # noqa: ANN001, ANN202
    return w, a + b"\0"


def _truncated(w, a, k):  # noqa: ANN001, ANN202
    return w, a[: len(a) // 2]


@pytest.mark.parametrize("attack,code", [
    (_unsigned, "bad_signature"), (_bare_manifest, "bad_signature"), (_wrong_key, "bad_signature"),
    (_tampered_version, "bad_signature"), (_tampered_device, "bad_signature"),
    (_garbage_signature, "bad_signature"), (_short_signature, "bad_signature"),
    (_wrong_hash, "hash_mismatch"), (_wrong_size, "size_mismatch"), (_truncated, "truncated"),
])
def test_tampered_update_is_refused_and_current_model_keeps_working(store, keys, text_model, attack, code):
    key, pub = keys
    before = listing(store)
    wrapper, archive = attack(*make_update(text_model.package, key), key)
    refused(code, apply_update, store, wrapper, archive, pub, DEVICE)
    refused(code, apply_update, store, json.dumps(wrapper).encode(), archive, pub, DEVICE)
    assert listing(store) == before
    assert assert_consistent(store, {"1.0.0"}).version == "1.0.0"


@pytest.mark.parametrize("version", ["1.0.0", "0.9.9", "0.10.0", "1"])
def test_older_or_equal_version_is_refused(store, keys, text_model, version):
    key, pub = keys
    refused("not_newer", apply_update, store, *make_update(text_model.package, key, version), pub, DEVICE)
    assert_consistent(store, {"1.0.0"})


def test_expired_and_wrong_device_updates_are_refused(store, keys, text_model):
    key, pub = keys
    refused("expired", apply_update, store, *make_update(text_model.package, key, expires_in=timedelta(seconds=-1)),
            pub, DEVICE)
    wrapper, archive = make_update(text_model.package, key)
    refused("expired", apply_update, store, wrapper, archive, pub, DEVICE,
            now=datetime.now(timezone.utc) + timedelta(days=2))
    refused("wrong_device", apply_update, store, *make_update(text_model.package, key, device="other-dev"),
            pub, DEVICE)
    assert_consistent(store, {"1.0.0"})


def test_verification_happens_before_the_archive_is_looked_at(keys, text_model):
    key, pub = keys
    wrapper, _ = make_update(text_model.package, key, version="1.0.0")
    # not_newer even though the "archive" is junk: the archive is never read for a refused update
    refused("not_newer", verify_update, wrapper, pub, "1.0.0", DEVICE)
    m = verify_update(wrapper, pub, "0.9", DEVICE)
    assert m.version == "1.0.0" and m.golden_input == GOLDEN


def test_signed_manifest_with_bad_schema_is_refused_after_its_signature(keys):
    key, pub = keys
    good = UpdateManifest.create("m", "1.0.0", b"abc").to_dict()
    for bad in ({**good, "size": "3"}, {**good, "extra": 1}, {**good, "expires": "tomorrow"},
                {**good, "expires": "2030-01-01T00:00:00"}, {**good, "schema_version": 2},
                {**good, "golden": {"input": 3}}, {k: v for k, v in good.items() if k != "sha256"}):
        refused("bad_manifest", verify_update, sign_manifest(bad, key), pub, None, DEVICE)
    refused("bad_manifest", verify_update, b"{not json", pub, None, DEVICE)
    refused("bad_manifest", verify_update, b"x" * 70000, pub, None, DEVICE)


@pytest.mark.parametrize("member", [
    "../evil.txt", "/tmp/edge-slm-evil.txt", "sub/../../evil.txt", "symlink", "hardlink", "fifo",
])
def test_unsafe_archive_members_are_refused_and_nothing_lands_outside(store, keys, text_model, member, tmp_path):
    key, pub = keys
    files = package_files(text_model.package)
    extra = []
    if member in ("symlink", "hardlink", "fifo"):
        info = tarfile.TarInfo("tokenizer2.json")
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[member]
        info.linkname = "/etc/passwd"
        extra.append(info)
    else:
        files[member] = b"owned"
    archive = tar_gz(files, extra)
    before = listing(store)
    refused("unsafe_archive", apply_update, store, *make_update(text_model.package, key, archive=archive), pub, DEVICE)
    assert listing(store) == before
    assert not (tmp_path / "evil.txt").exists() and not (store.root / "evil.txt").exists()
    assert not (store.versions / "evil.txt").exists() and not Path("/tmp/edge-slm-evil.txt").exists()
    assert_consistent(store, {"1.0.0"})


def test_duplicate_members_and_non_packages_are_refused(store, keys, text_model):
    key, pub = keys
    files = package_files(text_model.package)
    dup = tar_gz(files, [tarfile.TarInfo(MODEL_FILE)])  # a second, empty model.tflite after the real one
    refused("unsafe_archive", apply_update, store, *make_update(text_model.package, key, archive=dup), pub, DEVICE)
    no_manifest = tar_gz({MODEL_FILE: files[MODEL_FILE]})
    refused("bad_package", apply_update, store, *make_update(text_model.package, key, archive=no_manifest), pub, DEVICE)
    wrong_sha = dict(files, **{MODEL_FILE: files[MODEL_FILE][:-1] + b"\0"})
    refused("bad_package", apply_update, store, *make_update(text_model.package, key, archive=tar_gz(wrong_sha)),
            pub, DEVICE)
    not_gzip = b"PK\x03\x04 this is a zip"
    refused("bad_archive", apply_update, store, *make_update(text_model.package, key, archive=not_gzip), pub, DEVICE)
    # size and hash were signed over a cut archive: unpacking finds the cut
    cut = pack_package(text_model.package)[:-200]
    refused("truncated", apply_update, store, *make_update(text_model.package, key, archive=cut), pub, DEVICE)
    # an archive with the package in one top-level directory (tar czf pkg.tar.gz pkg/) is fine
    nested = tar_gz({f"pkg/{k}": v for k, v in files.items()})
    pkg = apply_update(store, *make_update(text_model.package, key, archive=nested), pub, DEVICE)
    assert pkg.version == "1.1.0"


@pytest.fixture(scope="module")
def other_tflite() -> bytes:
    """A valid .tflite that is not a text classifier: float32 [1, 4] -> [1, 2]."""
    from converters.tf_env import tf

    t = tf()

    @t.function(input_signature=[t.TensorSpec([1, 4], t.float32, name="x")])
    def f(x):  # noqa: ANN001, ANN202
        return {"y": x[:, :2] * 2.0}

    conv = t.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    return conv.convert()


def test_models_that_fail_their_golden_input_are_refused(store, keys, text_model, package_copy, other_tflite):
    key, pub = keys
    before = listing(store)
    (package_copy / TOKENIZER_FILE).write_text('{"model": "garbage"')
    e = refused("golden_failed", apply_update, store, *make_update(package_copy, key), pub, DEVICE)
    assert "tokenizer" in str(e)

    # Another valid model whose sha256 the manifest carries, but whose shapes are not the manifest's.
    shutil.copytree(text_model.package, package_copy, dirs_exist_ok=True)
    manifest = json.loads((package_copy / MANIFEST_FILE).read_text())
    import hashlib

    manifest["sha256"] = hashlib.sha256(other_tflite).hexdigest()
    manifest["size_bytes"] = len(other_tflite)
    (package_copy / MODEL_FILE).write_bytes(other_tflite)
    (package_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    ModelPackage.open(package_copy)  # a valid package: only loading the model shows it is wrong
    e = refused("golden_failed", apply_update, store, *make_update(package_copy, key), pub, DEVICE)
    assert "float32" in str(e)

    # The right model, but the signer expects another answer for the golden input.
    wrong = next(lbl for lbl in text_model.labels if lbl != load_task(store.current_package())(GOLDEN)["label"])
    refused("golden_failed", apply_update, store, *make_update(text_model.package, key, label=wrong), pub, DEVICE)

    def custom(pkg: ModelPackage) -> None:
        raise RuntimeError("latency too high")

    e = refused("golden_failed", apply_update, store, *make_update(text_model.package, key), pub, DEVICE, custom)
    assert "latency too high" in str(e)
    assert listing(store) == before
    assert_consistent(store, {"1.0.0"})


# --- apply, trial window, commit, rollback ----------------------------------------------------------
def test_update_applies_on_trial_and_commit_keeps_it(store, keys, text_model):
    key, pub = keys
    label = load_task(store.current_package())(GOLDEN)["label"]
    pkg = apply_update(store, *make_update(text_model.package, key, label=label), pub, DEVICE, trial_s=60)
    assert pkg.version == "1.1.0" and pkg.path.parent == store.versions
    assert store.current_package().path == pkg.path and store.previous_package().version == "1.0.0"
    trial = store.trial()
    assert trial is not None and trial.version == "1.1.0" and trial.deadline - trial.started == pytest.approx(60)
    refused("trial_pending", apply_update, store, *make_update(text_model.package, key, "1.2.0"), pub, DEVICE)
    assert store.check_trial(now=time.time() + 30) is False
    assert store.commit() is True and store.trial() is None
    assert store.recover(now=time.time() + 3600).version == "1.1.0"  # committed: the window no longer applies
    assert_consistent(store, {"1.1.0"})
    # and the next update supersedes the oldest version on disk
    apply_update(store, *make_update(text_model.package, key, "1.2.0"), pub, DEVICE)
    store.commit()
    assert sorted(p.name.split("-")[0] for p in store.versions.iterdir()) == ["1.1.0", "1.2.0"]


def test_trial_not_committed_in_time_reverts_to_previous(store, keys, text_model):
    key, pub = keys
    before = listing(store)
    apply_update(store, *make_update(text_model.package, key), pub, DEVICE, trial_s=5)
    assert store.installed_version() == "1.1.0"
    rec = store.recover(now=time.time() + 6)
    assert rec.version == "1.0.0" and rec.reverted_from == "1.1.0"
    assert listing(store) == before  # the trial's version is gone, previous is as it was
    assert_consistent(store, {"1.0.0"})
    assert store.commit() is False


def test_trial_window_passes_on_the_clock(keys, text_model, tmp_path):
    key, pub = keys
    clock = [1000.0]
    store = ModelStore(tmp_path / "s", clock=lambda: clock[0])
    store.install(text_model.package)
    apply_update(store, *make_update(text_model.package, key), pub, DEVICE, trial_s=10)
    clock[0] += 9
    assert store.check_trial() is False and store.installed_version() == "1.1.0"
    clock[0] += 2
    assert store.check_trial() is True and store.installed_version() == "1.0.0"


def test_trial_left_by_a_dead_process_is_reverted_on_start(store, keys, text_model, monkeypatch):
    key, pub = keys
    apply_update(store, *make_update(text_model.package, key), pub, DEVICE, trial_s=3600)
    assert store.recover().version == "1.1.0"  # same process, inside the window: still on trial
    monkeypatch.setattr(updates, "_PROCESS_TOKEN", "a-new-process")
    rec = ModelStore(store.root).recover()
    assert rec.version == "1.0.0" and rec.reverted_from == "1.1.0"
    assert_consistent(store, {"1.0.0"})


def test_trial_of_another_live_process_waits_for_its_deadline(store, keys, text_model, monkeypatch):
    key, pub = keys
    monkeypatch.setattr(updates, "_PROCESS_TOKEN", f"{os.getppid()}-the-agent")
    apply_update(store, *make_update(text_model.package, key), pub, DEVICE, trial_s=60)
    monkeypatch.setattr(updates, "_PROCESS_TOKEN", f"{os.getpid()}-a-cli-tool")
    assert store.recover().version == "1.1.0" and store.trial() is not None
    assert store.recover(now=time.time() + 61).version == "1.0.0"


def test_rollback_goes_to_previous_and_then_has_nowhere_to_go(store, keys, text_model):
    key, pub = keys
    refused("no_previous", store.rollback)
    apply_update(store, *make_update(text_model.package, key), pub, DEVICE)
    store.commit()
    assert store.rollback().version == "1.0.0"
    assert_consistent(store, {"1.0.0"})
    refused("no_previous", store.rollback)
    # rolled back from 1.1.0, the same signed update may be applied again
    assert apply_update(store, *make_update(text_model.package, key), pub, DEVICE).version == "1.1.0"


def test_unreadable_trial_record_counts_as_an_abandoned_trial(store, keys, text_model):
    key, pub = keys
    apply_update(store, *make_update(text_model.package, key), pub, DEVICE, trial_s=3600)
    (store.root / "trial.json").write_text("{half a reco")
    rec = store.recover()
    assert rec.version == "1.0.0" and rec.reverted_from == "?"
    assert_consistent(store, {"1.0.0"})


def test_current_damaged_from_outside_is_repaired_from_previous(store, keys, text_model):
    key, pub = keys
    apply_update(store, *make_update(text_model.package, key), pub, DEVICE)
    store.commit()
    (store.current_package().model_path).write_bytes(b"bit rot")
    rec = store.recover()
    assert rec.repaired and rec.version == "1.0.0"
    assert_consistent(store, {"1.0.0"})


# --- crashes at every step ---------------------------------------------------------------------------
def _new_process(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(updates, "_PROCESS_TOKEN", f"restarted-{time.monotonic_ns()}")


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_any_step_leaves_a_loadable_current_and_recover_ends_consistent(
        store, keys, text_model, step, monkeypatch):
    key, pub = keys
    wrapper, archive = make_update(text_model.package, key)
    if step in INSTALL_STEPS:
        store.crash_at = step
        with pytest.raises(SimulatedCrash):
            apply_update(store, wrapper, archive, pub, DEVICE)
        expected = {"1.0.0"}  # never committed: a restart goes back
    else:
        apply_update(store, wrapper, archive, pub, DEVICE)
        if step in ROLLBACK_STEPS:
            store.commit()
        store.crash_at = step
        with pytest.raises(SimulatedCrash):
            {**dict.fromkeys(COMMIT_STEPS, store.commit), **dict.fromkeys(REVERT_STEPS, store.rollback),
             **dict.fromkeys(ROLLBACK_STEPS, store.rollback)}[step]()
        expected = {"1.1.0"} if step in COMMIT_STEPS else {"1.0.0"} if step in REVERT_STEPS else {"1.0.0", "1.1.0"}
    # Right after the crash, before any recovery, current is a complete package.
    assert store.current_package().version in {"1.0.0", "1.1.0"}
    _new_process(monkeypatch)
    recovered = ModelStore(store.root)
    rec = recovered.recover()
    assert rec.version in expected
    assert_consistent(recovered, expected)
    assert recovered.recover().removed == ()  # idempotent
    # and the store still takes updates
    nxt = apply_update(recovered, *make_update(text_model.package, key, "2.0.0"), pub, DEVICE)
    assert nxt.version == "2.0.0" and recovered.commit()


@pytest.mark.parametrize("step", [s for s in INSTALL_STEPS if s not in ("install:trial_written",
                                                                         "install:previous_linked")])
def test_crash_during_the_first_install_leaves_nothing_or_a_complete_model(text_model, tmp_path, step):
    store = ModelStore(tmp_path / "s", crash_at=step)
    with pytest.raises(SimulatedCrash):
        store.install(text_model.package)
    store = ModelStore(tmp_path / "s")
    store.recover()
    if store.installed_version() is None:
        assert listing(store) == ["versions"]
        store.install(text_model.package)
    assert_consistent(store, {"1.0.0"})


_KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from edge_slm import updates
from edge_slm.signing import load_private_key
from tests.edge_slm.test_updates import make_update

step = {step!r}
orig = updates.ModelStore._step
def die(self, name):
    if name == step:
        os._exit(9)  # the process is gone: no finally, no cleanup, no flush
    orig(self, name)
updates.ModelStore._step = die
store = updates.ModelStore({store!r})
key = load_private_key({key!r})
wrapper, archive = make_update(__import__("pathlib").Path({pkg!r}), key)
updates.apply_update(store, wrapper, archive, key.public_key(), "d", golden=lambda p: None, trial_s=3600)
os._exit(0)
"""


@pytest.mark.parametrize("step", ["install:staged", "install:trial_written", "install:current_replaced",
                                  "install:done", None])
def test_killed_process_mid_update_is_undone_by_recover(store, text_model, tmp_path, step):
    private_pem, _ = generate_keypair()
    script = _KILL_SCRIPT.format(root=str(ROOT), step=step, store=str(store.root), key=private_pem,
                                 pkg=str(text_model.package))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == (0 if step is None else 9), proc.stderr.decode()[-2000:]
    assert store.current_package().version in {"1.0.0", "1.1.0"}
    rec = store.recover()  # this process did not start the trial: its owner died before committing
    assert rec.version == "1.0.0"
    assert_consistent(store, {"1.0.0"})


# --- the MQTT-facing receiver ------------------------------------------------------------------------
def command(cid, wrapper: dict, chunks: int) -> bytes:  # noqa: ANN001
    return json.dumps({"id": cid, "update": wrapper, "chunks": chunks}).encode()


def test_chunks_round_trip_and_bad_chunks_are_refused():
    data = os.urandom(1000)
    chunks = split_chunks("id-1", data, chunk_size=300)
    assert len(chunks) == 4 and b"".join(decode_chunk(c)[3] for c in chunks) == data
    assert [decode_chunk(c)[:3] for c in chunks][-1] == ("id-1", 3, 4)
    for bad in (b"", b"ESU1", b"XXXX\x01a" + bytes(8), encode_chunk("a", 0, 1, b"")[:-3], b"ESU1\x00" + bytes(8),
                encode_chunk("a", 0, 1, b"")[:5] + encode_chunk("a", 0, 1, b"")[6:],
                b"ESU1\x01a" + bytes(4) + bytes(4), b"ESU1\x01a\x00\x00\x00\x05\x00\x00\x00\x05"):
        refused("bad_chunk", decode_chunk, bad)
    assert len(split_chunks("x", b"")) == 1


@settings(max_examples=300, deadline=None)
@given(rest=st.binary(max_size=80))
def test_fuzzed_chunks_decode_or_are_refused_as_bad_chunk(rest):
    try:
        tid, index, count, data = decode_chunk(b"ESU1" + rest)
    except UpdateError as exc:
        assert exc.code == "bad_chunk"
    else:
        assert index < count and encode_chunk(tid, index, count, data) == b"ESU1" + rest


def test_receiver_applies_chunked_update_and_reports_missing_chunks(store, keys, text_model):
    key, pub = keys
    rx = UpdateReceiver(store, pub, DEVICE, trial_s=30)
    wrapper, archive = make_update(text_model.package, key)
    chunks = split_chunks("c1", archive, chunk_size=20_000)
    for c in chunks[:-1]:
        rx.on_blob(c)
    reply = rx.on_command(command("c1", wrapper, len(chunks)))
    assert reply == {"schema_version": 1, "id": "c1", "ok": False, "code": "truncated", "version": "1.0.0",
                     "message": reply["message"]}
    assert f"{len(chunks) - 1} of {len(chunks)}" in reply["message"]
    # bad signature is reported as such even with no chunks at all
    assert rx.on_command(command("c2", {"manifest": wrapper["manifest"]}, 1))["code"] == "bad_signature"
    for c in reversed(split_chunks("c3", archive, chunk_size=20_000)):  # any order, with duplicates
        rx.on_blob(c)
        rx.on_blob(c)
    rx.on_blob(b"not a chunk")
    reply = rx.on_command(command("c3", wrapper, len(chunks)))
    assert reply["ok"] is True and reply["code"] == "applied" and reply["version"] == "1.1.0", reply
    again = rx.on_command(command("c3", wrapper, len(chunks)))  # a QoS 1 duplicate of the command
    assert again["ok"] is False and again["code"] in ("not_newer", "truncated")
    assert_consistent(store, {"1.1.0"})


def test_receiver_bounds_what_unauthenticated_chunks_may_buffer(store, keys):
    _, pub = keys
    rx = UpdateReceiver(store, pub, DEVICE, max_bytes=10_000, max_transfers=2)
    for i in range(5):
        rx.on_blob(encode_chunk(f"t{i}", 0, 2, b"x" * 3000))
    assert list(rx._transfers) == ["t3", "t4"]  # noqa: SLF001
    rx.on_blob(encode_chunk("big", 0, 1, b"x" * 20_000))
    assert "big" not in rx._transfers  # noqa: SLF001
    for i in range(300):  # empty chunks cost something too
        rx.on_blob(encode_chunk("t4", i % 2, 2, b""))
    assert sum(t.size for t in rx._transfers.values()) <= 10_000  # noqa: SLF001


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
commands = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=80) | st.integers() | json_values,
    "update": st.fixed_dictionaries({}, optional={"manifest": st.dictionaries(st.sampled_from(
        ["schema_version", "name", "version", "sha256", "size", "expires", "created", "device", "golden", "x"]),
        json_values), "signature": st.text(max_size=100) | json_values}) | json_values,
    "chunks": st.integers() | json_values,
})


@pytest.fixture(scope="module")
def fuzz_receiver(text_model, tmp_path_factory, keys):
    store = ModelStore(tmp_path_factory.mktemp("fuzz") / "store")
    store.install(text_model.package)
    return UpdateReceiver(store, keys[1], DEVICE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=300) | commands.map(lambda c: json.dumps(c).encode())
       | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_commands_always_get_an_error_reply(fuzz_receiver, payload):
    fuzz_receiver.on_blob(payload)
    reply = fuzz_receiver.on_command(payload)
    assert reply["ok"] is False and isinstance(reply["code"], str) and reply["code"] and reply["message"]
    assert reply["code"] != "internal_error", reply
    assert set(reply) == {"schema_version", "id", "ok", "code", "message", "version"}
    assert reply["version"] == "1.0.0"
    json.dumps(reply)


@settings(max_examples=200, deadline=None)
@given(manifest=st.dictionaries(st.sampled_from(
    ["schema_version", "name", "version", "sha256", "size", "expires", "created", "device", "golden"]),
    json_values | st.sampled_from([1, "1.2.3", "a" * 64, "2999-01-01T00:00:00+00:00", "*", DEVICE])))
def test_fuzzed_signed_manifests_are_accepted_or_refused_with_a_code(keys, manifest):
    key, pub = keys
    try:
        wrapper = sign_manifest(manifest, key)
    except ValueError:  # NaN cannot be signed canonically
        return
    try:
        m = verify_update(wrapper, pub, "1.0.0", DEVICE)
    except UpdateError as exc:
        assert exc.code in ("bad_manifest", "expired", "wrong_device", "not_newer")
    else:
        assert is_newer(m.version, "1.0.0") and m.device in ("*", DEVICE)


# --- end to end: the CLI and a real broker ----------------------------------------------------------
def test_keygen_sign_and_receiver_end_to_end(store, text_model, tmp_path):
    keys_dir = tmp_path / "keys"
    r = run_cli("keygen", "-o", str(keys_dir))
    assert r.returncode == 0, r.stderr.decode()
    assert stat.S_IMODE((keys_dir / "update_key.pem").stat().st_mode) == 0o600
    r = run_cli("keygen", "-o", str(keys_dir))
    assert r.returncode == 1 and b"--force" in r.stderr and len(r.stderr.decode().strip().splitlines()) == 1
    label = load_task(store.current_package())(GOLDEN)["label"]
    out = tmp_path / "out" / "intents-1.1.0.json"
    r = run_cli("sign", str(text_model.package), "--key", str(keys_dir / "update_key.pem"), "--version", "1.1.0",
                "--device", DEVICE, "--golden", GOLDEN, "--golden-label", label, "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    archive = (tmp_path / "out" / "intents-1.1.0.tar.gz").read_bytes()
    shipped = ModelPackage.open(tmp_path / "out" / "intents-1.1.0.tar.gz")  # the archive is a usable package
    assert shipped.version == "1.1.0" and shipped.path == tmp_path / "out" / "intents-1.1.0"
    wrapper = json.loads(out.read_text())
    assert wrapper["manifest"]["golden"] == {"input": GOLDEN, "label": label}
    r = run_cli("sign", str(text_model.package), "--key", str(keys_dir / "update_key.pem"), "--version", "1.x",
                "-o", str(tmp_path / "bad.json"))
    assert r.returncode == 1 and b"--version" in r.stderr

    rx = UpdateReceiver(store, keys_dir / "update_key.pub", DEVICE)
    for chunk in split_chunks("e2e", archive):
        rx.on_blob(chunk)
    reply = rx.on_command(command("e2e", wrapper, 1))
    assert reply["ok"] is True and reply["version"] == "1.1.0", reply
    pkg = store.current_package()
    assert pkg.sha256 == ModelPackage.open(text_model.package).sha256  # same model, re-versioned manifest
    assert json.loads((text_model.package / MANIFEST_FILE).read_text())["version"] == "1.0.0"  # untouched
    rx2 = UpdateReceiver(store, keys_dir / "update_key.pub", "another-device")
    rx2.on_blob(split_chunks("x", archive)[0])
    assert rx2.on_command(command("x", wrapper, 1))["code"] == "wrong_device"


class FakeDevice:
    """Plays the agent's side of cmd/model/update with UpdateReceiver over a real broker."""

    def __init__(self, url: str, device: str, receiver: UpdateReceiver) -> None:
        self.col = Collector(url, f"edge-slm/{device}/cmd/model/update", f"edge-slm/{device}/cmd/model/update/blob")
        self.base = f"edge-slm/{device}/cmd/model/update"
        self.receiver = receiver
        self.blobs = 0
        self.replies: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # Off paho's network thread, as the agent must do: the golden check takes a while.
        done = 0
        while not self._stop.is_set():
            msgs = self.col.wait_for(done + 1, timeout=0.2)
            for topic, payload, _ in msgs[done:]:
                done += 1
                if topic.endswith("/blob"):
                    self.blobs += 1
                    self.receiver.on_blob(payload)
                else:
                    reply = self.receiver.on_command(payload)
                    self.replies.append(reply)
                    self.col.publish(f"{self.base}/reply", json.dumps(reply))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.col.close()


def test_publish_model_round_trip_over_mosquitto(mosquitto, store, text_model, package_copy, tmp_path):
    assert run_cli("keygen", "-o", str(tmp_path / "k")).returncode == 0
    dev = "upd-mqtt-1"
    device = FakeDevice(mosquitto.url, dev, UpdateReceiver(store, tmp_path / "k" / "update_key.pub", dev))
    # incompressible extra file: the archive needs 3 chunks of 256 KiB
    (package_copy / "notes.bin").write_bytes(os.urandom(600 * 1024))
    args = [str(package_copy), "--device", dev, "--key", str(tmp_path / "k" / "update_key.pem"),
            "--broker", mosquitto.url, "--timeout", "30"]
    try:
        r = run_cli("publish-model", *args, "--version", "1.1.0", "--golden", GOLDEN)
        assert r.returncode == 0, r.stderr.decode()
        assert b"1.1.0 applied" in r.stdout
        assert device.blobs == 3 and device.replies[-1]["ok"] is True
        assert store.current_package().version == "1.1.0" and (store.current_package().path / "notes.bin").is_file()
        r = run_cli("publish-model", *args, "--version", "1.1.0", "--json")
        assert r.returncode == 1
        assert json.loads(r.stdout)["code"] == "not_newer"
        assert_consistent(store, {"1.1.0"})
    finally:
        device.close()
    r = run_cli("publish-model", *args, "--version", "1.2.0", "--timeout", "1")
    assert r.returncode == 1 and b"no reply from device" in r.stderr
