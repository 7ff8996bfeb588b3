"""Fixtures for the sensor work (trained models, compiled programs); loaded from conftest.py via pytest_plugins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

# 30 machines with every condition + 60 healthy ones, 4 s each: the same recipe the CLI uses by default
MACHINES, NORMAL_ONLY, SECONDS, SEED = 30, 60, 4.0, 0


@dataclass
class VibrationDataset:
    recordings: list  # converters.datasets.vibration.Recording
    data: object  # converters.sensor_models.SensorData (windows, features, split by machine)

    def test_recordings(self) -> list:
        ids = set(self.data.machine_ids("test"))
        return [r for r in self.recordings if r.machine.machine_id in ids]


@dataclass
class TrainedPackage:
    path: Path
    keras_path: Path  # the float model it was converted from


@pytest.fixture(scope="session")
def vibration_dataset() -> VibrationDataset:
    """Simulated recordings, windowed and featurized with the device code, split by machine."""
    from converters import sensor_models
    from converters.datasets import vibration

    recordings = vibration.make_dataset(MACHINES, SECONDS, seed=SEED, normal_only=NORMAL_ONLY)
    return VibrationDataset(recordings, sensor_models.prepare_data(recordings, seed=SEED))


@pytest.fixture(scope="session")
def anomaly_trained(vibration_dataset, tmp_path_factory) -> TrainedPackage:  # noqa: ANN001
    """Full-int8 autoencoder package (threshold calibrated on validation machines) and its float model."""
    from converters import sensor_models

    work = tmp_path_factory.mktemp("sensor_anomaly")
    pkg = sensor_models.train_anomaly(vibration_dataset.data, work / "vibration-anomaly", seed=SEED,
                                      keras_out=work / "ae.keras")
    return TrainedPackage(pkg.path, work / "ae.keras")


@pytest.fixture(scope="session")
def fault_trained(vibration_dataset, tmp_path_factory) -> TrainedPackage:  # noqa: ANN001
    """Full-int8 fault classifier package (normal + 5 faults) and its float model."""
    from converters import sensor_models

    work = tmp_path_factory.mktemp("sensor_faults")
    pkg = sensor_models.train_classifier(vibration_dataset.data, work / "vibration-faults", seed=SEED,
                                         keras_out=work / "clf.keras")
    return TrainedPackage(pkg.path, work / "clf.keras")


@pytest.fixture(scope="session")
def anomaly_package(anomaly_trained) -> Path:  # noqa: ANN001
    """The anomaly package directory."""
    return anomaly_trained.path


@pytest.fixture(scope="session")
def fault_package(fault_trained) -> Path:  # noqa: ANN001
    """The fault classifier package directory."""
    return fault_trained.path
