"""Agent sources against real inputs: psutil on this host, CSV files, JSON lines, a pipe."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import threading
from itertools import islice
from pathlib import Path

import pytest

from edge_agent.activation import ActivationStore, ActiveRecord
from edge_agent.daemon import Backoff
from edge_agent.sources import SourceError, open_source, parse_source
from shared.bundle import BundleSpec, GoldenVectors, ScoreSpec, TensorSpec, write_bundle


def test_host_source_reads_this_hosts_metrics() -> None:
    stop = threading.Event()
    samples = list(islice(open_source(parse_source("host?period=0.05"), stop), 2))
    for s in samples:
        assert {"cpu", "memory", "load"} <= set(s.values)
        assert 0 <= s.values["cpu"] <= 100 and 0 < s.values["memory"] <= 100
        assert s.values["disk"] >= 0 and s.values["network"] >= 0


def test_csv_source_multivariate_and_stop(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("timestamp,cpu,mem\n" + "".join(f"2026-01-01 00:{i:02d}:00,{i},{2 * i}\n" for i in range(50)))
    stop = threading.Event()
    it = open_source(parse_source(f"csv:{p}"), stop)
    first = next(it)
    assert first.timestamp == "2026-01-01 00:00:00" and first.values == {"cpu": 0.0, "mem": 0.0}
    stop.set()
    assert list(it) == []  # a stopped source ends


def test_csv_source_reports_a_bad_row(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("timestamp,value\n2026-01-01 00:00:00,1\n2026-01-01 00:05:00,x\n")
    with pytest.raises(SourceError, match=":3: column 'value'"):
        list(open_source(parse_source(f"csv:{p}"), threading.Event()))


def test_stdin_json_lines_skip_bad_lines(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO('{"timestamp": "t1", "cpu": 1.5}\nnot json\n{"cpu": null}\n')
    samples = list(open_source(parse_source("stdin"), threading.Event(), stdin=stream))
    assert samples[0].timestamp == "t1" and samples[0].values == {"cpu": 1.5}
    assert len(samples) == 2 and samples[1].values["cpu"] != samples[1].values["cpu"]  # NaN
    assert "line 2: skipped" in capsys.readouterr().err


def test_backoff_is_jittered_exponential_and_capped() -> None:
    import random

    b = Backoff(base=0.5, cap=8.0, rng=random.Random(7))
    delays = [b.next() for _ in range(12)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    assert max(delays[:2]) <= 1.0 and max(delays[6:]) > 2.0  # grows, then stays under the cap
    assert len(set(delays)) == len(delays)  # jittered: no two agents retry in lockstep
    b.reset()
    assert b.next() <= 0.5 + 1e-9


def test_stdin_pipe_that_stays_open_ends_when_stopped() -> None:
    read_end, write_end = os.pipe()
    stop = threading.Event()
    with os.fdopen(read_end) as stream, os.fdopen(write_end, "w") as feed:
        feed.write('{"timestamp": "t1", "cpu": 1}\n{"timestamp": "t2", "cp')  # half a line
        feed.flush()
        samples = open_source(parse_source("stdin"), stop, stdin=stream)
        assert next(samples).timestamp == "t1"
        got: list = []
        reader = threading.Thread(target=lambda: got.extend(samples))  # blocks: the pipe is open
        reader.start()
        stop.set()
        reader.join(10)
        assert not reader.is_alive(), "a stopped stdin source kept waiting for input"
        assert got == []


def _msq_bundle() -> bytes:
    """A tiny ONNX model (mean of squares over 8 samples of ``value``, threshold 0.5)."""
    from onnx import TensorProto, helper  # the test may use onnx; the agent does not

    w = 8
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["x2"]),
         helper.make_node("ReduceMean", ["x2", "axes"], ["score"], keepdims=0)],
        "msq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w, 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    spec = BundleSpec(
        name="msq", format="onnx", quantization="fp32", model_file="model.onnx",
        inputs=(TensorSpec("x", "float32", (None, w, 1)),),
        outputs=(TensorSpec("score", "float32", (None,)),),
        window=w, features=("value",), score=ScoreSpec("msq", 0.5, math.log(0.5), 1.0),
        golden=GoldenVectors([[[2.0]] * w, [[0.0]] * w], [4.0, 0.0], 1e-6, 1e-6),
    )
    return write_bundle(spec, model.SerializeToString())


def test_agent_fed_by_an_open_pipe_stops_promptly_on_sigterm(tmp_path: Path, broker) -> None:
    from helpers_delivery import Agents, Watch

    from trainer.fleet.tuf_repository import TufRepository

    root = TufRepository.init(tmp_path / "tuf").root_json_path
    agents = Agents(tmp_path / "agents", broker.url)
    config = agents.config("pipe-1", trust=root, source="stdin")
    # The agent serves a model it activated earlier: the stdin source is read at once.
    bundle = _msq_bundle()
    sha = hashlib.sha256(bundle).hexdigest()
    store = ActivationStore(config.parent / "state")
    store.stage(sha, bundle)
    store.activate("default", ActiveRecord("msq", 1, "onnx", "fp32", sha, "artifacts/msq.zip", 1))
    watch = Watch(broker.url, agents.tail)
    try:
        agent = agents.start(config, stdin=True)
        agent.feed(json.dumps({"timestamp": f"2026-01-01 00:00:{i:02d}", "value": 2.0}) for i in range(10))
        # 10 samples, window 8: three anomalous windows. Once they are delivered, the agent has
        # read everything and waits on a pipe that stays open.
        watch.wait_for(lambda: watch.event_seqs() == {1, 2, 3}, 60, "three events")
        agent.signal(signal.SIGTERM)
        assert agent.wait(15) == 0, agent.tail()
        assert "Traceback" not in agent.log.read_text()
    finally:
        watch.close()
        agents.close()
