"""The tools' pure helpers (the GPU-side tools themselves run on the device)."""

import importlib.util
import os

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, "tools", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _event(pid, name, ts, dur, tid=1):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_plan_trace_timeline_finds_busy_time_and_gaps():
  """Two overlapping kernels, a gap the host spends in a conditional, a last kernel: the
  busy time is the union, the gaps are ranked, and each names the host event in it."""
  pt = _tool("plan_trace")
  host, dev = 7, 9
  events = [
    {"ph": "M", "pid": host, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": dev, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    _event(host, "PjitFunction(plan)", 100, 400),
    _event(host, "Execute", 130, 30, tid=2),
    _event(host, "ConditionalThunk", 210, 85, tid=2),
    _event(dev, "k1", 160, 40, tid=3),
    _event(dev, "k2", 190, 20, tid=4),  # overlaps k1 (another stream)
    _event(dev, "k3", 300, 50, tid=3),
    _event(dev, "end: k3", 350, 1, tid=3),  # not a kernel
  ]
  t = pt.timeline(events, min_gap_us=5.0)
  assert t["window_us"] == pytest.approx(250.0)  # 100 -> 350
  assert t["busy_us"] == pytest.approx(50.0 + 50.0)  # [160, 210) and [300, 350)
  assert t["first_kernel_us"] == pytest.approx(60.0)
  assert t["idle_between_us"] == pytest.approx(90.0)
  assert t["idle_gaps"] == 1
  assert t["dispatch_us"] == pytest.approx(400.0)
  assert [g["gap_us"] for g in t["gaps"]] == [90.0, 60.0]
  assert t["gaps"][0]["host"][0].startswith("ConditionalThunk")
  assert t["gaps"][1]["host"][0].startswith("Execute")
  assert [line.split()[-1] for line in t["startup"]] == ["PjitFunction(plan)", "Execute"]
  pt.print_timeline(t)


def test_plan_trace_timeline_needs_device_events():
  pt = _tool("plan_trace")
  events = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    _event(1, "PjitFunction(plan)", 0, 10),
  ]
  with pytest.raises(ValueError, match="no device events"):
    pt.timeline(events)


def test_plan_variants_kernel_timeline_marks_idle_starts():
  """The device kernels (events with an HLO op) in start order, from the first kernel's
  start; "*" where the device had been idle (k3 after a gap), not where one overlaps."""
  pv = _tool("plan_variants")

  def kernel(name, ts, dur, tid):
    return {**_event(9, name, ts, dur, tid), "args": {"hlo_op": "command_buffer_1"}}

  events = [
    _event(7, "PjitFunction(plan)", 100, 400),  # (host: no HLO op)
    kernel("k2", 190, 20, 4),
    kernel("k1", 160, 40, 3),
    kernel("k3", 300, 50, 3),
  ]
  lines = pv.kernel_timeline(events)
  assert [ln.split() for ln in lines] == [
    ["0.0", "40.0", "tid3", "k1"],
    ["30.0", "20.0", "tid4", "k2"],
    ["140.0", "50.0", "*", "tid3", "k3"],
  ]
  assert pv.kernel_timeline(events[:1]) == []
