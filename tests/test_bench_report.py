"""tests/bench/report.py: merging a lent GPU machine's results into this machine's report."""

import json
import re
from pathlib import Path

from tests.bench.report import markdown, merge


def results(machine: str, **sections):
    return {"machine": {"date_utc": machine, "gpu": machine}, "sections": sections}


def test_merge_takes_measured_sections_and_keeps_their_machine():
    base = results("here", cpu={"error": "x"}, gpu={"measured": False})
    gpu = {"measured": True, "rows": [1]}
    merged = merge(base, results("h200", gpu=gpu, stack={"error": "no redis there"}))
    assert merged["sections"]["gpu"]["rows"] == [1]
    assert merged["sections"]["gpu"]["_machine"]["gpu"] == "h200"
    assert "stack" not in merged["sections"]  # a section that failed elsewhere replaces nothing
    assert base["sections"]["gpu"] == {"measured": False}  # the base itself is left as it was


def test_an_unmeasured_gpu_section_replaces_nothing():
    base = results("here", gpu={"measured": True, "rows": [2]})
    merged = merge(base, results("laptop", gpu={"measured": False}))
    assert merged["sections"]["gpu"]["rows"] == [2]


def test_the_report_names_the_machine_a_merged_section_came_from():
    res = results("here", cpu={"error": "not run"})
    res["sections"]["stack"] = {"error": "boom", "_machine": {"date_utc": "elsewhere", "gpu": "H200"}}
    res["machine"].update(git_commit="abc", cpu_model="c", logical_cpus=2, usable_cpus=2, torch="t",
                          torch_threads=2, transformers="x", python="3", os="linux")
    md = markdown(res)
    assert "From another run" in md and "GPU H200" in md


def test_a_measured_gpu_section_renders_a_row_per_variant_and_stream_count():
    """The section's real structure (its CPU smoke run, no compile, no baseline) rendered as a GPU run
    would be: a rendering bug must not wait for a lent GPU to show."""
    from tests.bench import gpu
    from tests.bench.report import gpu_md

    g = gpu.run(smoke=True, baseline=False, compile_baseline=False, max_len=256, variants=["graphs"])
    assert [(r["variant"], r["concurrency"]) for r in g["rows"]] == [("graphs", 1), ("graphs", 4)]
    g.update(measured=True, card="H200", copy_GBps_rw=4230)
    g["variants"].append({**g["variants"][0], "variant": "compiled", "compile_decode": True, "compiled": False})
    md = "\n".join(gpu_md(g))
    assert "H200; measured copy bandwidth 4,230 GB/s" in md
    assert [line.split("|")[1:3] for line in md.splitlines() if line.startswith("| graphs")] == [
        [" graphs ", " 1 "],
        [" graphs ", " 4 "],
    ]
    assert "`compiled`: " in md and "torch.compile failed; this ran uncompiled" in md
    assert "Baseline not run: --no-baseline." in md
    assert re.search(r"Decode check on the card .*: `graphs` max \|Δlogit\| [-+.e\d]+ \(logits up to [.\d]+\), "
                     r"same argmax \d+/25 steps, 3 graphs, uncompiled", md)


def test_http_stages_come_from_each_request_own_record(r):
    """stage_times reads a turn's record and stream (as the worker and API write them) into the request's
    stages; the summary's p50s render in the HTTP section."""
    import json as _json

    from tests.bench.http import Req, stage_times, summarize
    from tests.bench.report import http_md

    q = Req("q", sent=100.0, first=100.120, end=101.0, completion_tokens=4, prompt_tokens=9, finish_reason="length",
            sent_wall=5000.0, turn_id="a" * 32)
    r.hset(f"chat:turn:{q.turn_id}", mapping={"enqueued_at": 5000.010, "started_at": 5000.015,
                                               "result": _json.dumps({"timings": {"prefill_s": 0.080}})})
    r.xadd(f"chat:turn:{q.turn_id}:stream", {"ev": "start", "a": "1"}, id="5000016-0")
    r.xadd(f"chat:turn:{q.turn_id}:stream", {"a": "1", "t": "Hi"}, id="5000100-0")
    stage_times(r, [q])
    assert q.stages == {"api": 10.0, "pickup": 5.0, "worker": 85.0, "prefill": 80.0, "out": 20.0, "path": 40.0}
    s = summarize([[q]], 4)
    assert s["stages_ms_p50"]["path"] == 40.0 and s["path_ms_p95"] == 40.0
    h = {"redis_url": "redis://x", "model": "m", "device_preset": "cpu", "slots": 8, "threads": 2,
         "stream_flush_ms": 50, "max_tokens": 4, "clients": 8, "questions": ["q"], "1_client": s}
    assert "p50 40.0, p95 40.0" in "\n".join(http_md(h))


def test_the_multiturn_section_summarizes_turns_and_renders_every_configuration():
    """tests/bench/multiturn.py's summary on made-up turns (the real run takes half an hour): per-turn
    TTFT, reuse and stickiness computed from the turns, then rendered with the targets."""
    from tests.bench import multiturn as mt

    turns = [mt.Turn(c, t, ttft_ms=100.0 + 10 * t * (c + 1), prompt_tokens=100 + 50 * t, cached_tokens=40 * t,
                     worker=f"w{c % 2 if t < 2 else 0}") for c in range(3) for t in range(10)]
    s = mt.summarize(turns, wall_s=12.0)
    assert s["ttft_ms_by_turn"]["1"] == {"p50": 100.0, "p95": 100.0, "n": 3}
    # turns 9-10 (indexes 8, 9): 180 260 340 and 190 280 370 ms: median 270
    assert s["ttft_ms_p50_turns_9_12"] == 270.0 and s["late_over_first"] == 2.7
    assert s["prompt_tokens"] == 3 * sum(100 + 50 * t for t in range(10))
    assert s["cached_tokens"] == 3 * sum(40 * t for t in range(10))
    assert s["conversations_on_one_worker"] == 2 and s["conversations"] == 3  # conversation 1 moved w1 -> w0
    res = results("here", multiturn={"model": "m", "device_preset": "cpu", "workload": {"conversations": 3},
                                     "3_workers_cache_aware": {**s, "workers": 3, "prefix_cache": True,
                                                               "routing": "cache_aware"},
                                     "targets": {"late_over_first_cache_on": {"value": None, "target": 1.5},
                                                 "reuse_3_workers_cache_aware": {"value": s["reuse"],
                                                                                 "target": 0.85, "met": False}}})
    res["machine"].update(git_commit="abc", cpu_model="c", logical_cpus=2, usable_cpus=2, torch="t",
                          torch_threads=2, transformers="x", python="3", os="linux")
    md = markdown(res)
    assert "## 5. Multi-turn conversations" in md
    assert "3 worker(s), cache on, routing cache_aware" in md and "2/3" in md
    target_line = next(ln for ln in md.splitlines() if ln.startswith("Targets: TTFT p50 turns 9-12"))
    assert f"{100 * s['reuse']:.1f}%" in target_line and "❌" in target_line


def _sse(*events: str) -> bytes:
    return "".join(f"{e}\n\n" for e in events).encode()


def test_the_benches_one_stream_reader_times_and_checks_every_kind_of_stream():
    """tests/bench/http.py's stream_chat, which the HTTP, peers and multi-turn benches all read with: pings
    skipped, deltas joined and timed, usage read (with cached tokens), and what each server may leave out
    treated as the caller asked (our API must send [DONE] and usage; a peer without usage that ended by
    length counts max_tokens)."""
    import json as _json

    import httpx

    from tests.bench.http import Req, stream_chat

    def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> str:
        c: dict = {"id": "chatcmpl-" + "b" * 32, "choices": [] if usage else [
            {"delta": {"content": content} if content else {}, "finish_reason": finish}]}
        if usage:
            c["usage"] = usage
        return "data: " + _json.dumps(c)

    usage = {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 5}}
    bodies = {
        "full": _sse(": ping", chunk("He"), chunk("llo"), chunk(finish="length"), chunk(usage=usage), "data: [DONE]"),
        "no_usage": _sse(chunk("Hi"), chunk(finish="length"), "data: [DONE]"),
        "cut": _sse(chunk("Hi")),
        "error": _sse(chunk("Hi"), 'data: {"error": {"message": "worker lost"}}'),
    }

    def serve(request: httpx.Request) -> httpx.Response:
        kind = _json.loads(request.content)["kind"]
        if kind == "refused":
            return httpx.Response(503, json={"error": {"message": "no live worker"}})
        return httpx.Response(200, content=bodies[kind], headers={"content-type": "text/event-stream"})

    with httpx.Client(transport=httpx.MockTransport(serve)) as client:
        def read(kind: str, **kw: bool) -> Req:
            return stream_chat(client, "http://x", {"kind": kind, "max_tokens": 7}, Req(kind), **kw)

        full = read("full")
        assert full.error is None and full.text == "Hello" and full.chars == 5 and full.turn_id == "b" * 32
        assert (full.prompt_tokens, full.completion_tokens, full.cached_tokens) == (9, 2, 5)
        assert full.sent <= full.first <= full.end and full.finish_reason == "length"
        assert "stream ended early" in read("no_usage").error  # our API always sends usage
        peer = read("no_usage", usage_required=False)
        assert peer.error is None and peer.completion_tokens == 7 and not peer.usage_reported
        assert "stream ended early" in read("cut", usage_required=False).error
        assert "worker lost" in read("error").error
        assert "HTTP 503" in read("refused").error


def test_the_benches_wait_for_a_server_until_it_answers_exits_or_times_out():
    """tests/bench/common.py's wait_http_ok, which the HTTP bench's API and the peers' servers start with."""
    import subprocess
    import sys

    import pytest

    from producer.embedded import free_port
    from tests.bench.common import wait_http_ok

    gone = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    gone.wait(10)
    with pytest.raises(RuntimeError, match="exited with 3: ...LOG"):
        wait_http_ok(gone, "http://127.0.0.1:9/", 5, "gone", lambda: "LOG")
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(srv, f"http://127.0.0.1:{port}/", 20, "srv", lambda: "")  # returns once it answers 200
        with pytest.raises(TimeoutError, match="not ready in 0.5 s"):
            wait_http_ok(srv, f"http://127.0.0.1:{port}/no-such-page", 0.5, "srv", lambda: "")
    finally:
        srv.kill()
        srv.wait(10)


def test_a_run_keeps_the_sections_it_did_not_run_and_the_hand_kept_reading_notes(tmp_path):
    """`--only multiturn` (or a default run, which leaves multiturn out) replaces only what it measured: the other
    sections stay as last measured, dated by their own run; the reading notes written by hand stay."""
    from tests.bench.report import READING_TITLE, carry_over, write

    old = {"machine": {"date_utc": "2026-11-30 12:00:00"}, "sections": {
        "cpu": {"_machine": {"date_utc": "2026-11-30 12:00:00"}, "rows": []},
        "http": {"error": "it failed"}}}
    new = {"machine": {"date_utc": "2026-12-01 03:00:00"}, "sections": {"multiturn": {"configs": []}}}
    res = carry_over(old, new)
    assert set(res["sections"]) == {"cpu", "multiturn"} and res["machine"] == new["machine"]  # a failed one is not
    md_path = tmp_path / "B.md"
    md_path.write_text(f"# old\n\n{READING_TITLE}\n\n- a note written by hand\n")
    machine = json.loads((Path(__file__).parent.parent / "docs" / "benchmarks.json").read_text())["machine"]
    md = write({"machine": machine, "sections": {}}, md_path, None)
    assert "a note written by hand" not in md  # the rendering itself ...
    assert md_path.read_text().endswith(f"{READING_TITLE}\n\n- a note written by hand\n")  # ... the file keeps it


def test_a_partial_peers_run_keeps_the_parts_it_did_not_run_marked_with_their_run():
    """`make bench-peers ARGS='--only engine'` replaces the engine table; the HTTP and multi-turn tables stay, each
    saying which run they are from."""
    from tests.bench.report import carry_peers, peers_md

    old = json.loads((Path(__file__).parent.parent / "docs" / "benchmarks-peers.json").read_text())
    for part in ("http", "multiturn"):  # as measured by that run itself
        old[part].pop("carried_from", None)
    new = {**{k: v for k, v in old.items() if k not in ("engine", "http", "multiturn")},
           "machine": {**old["machine"], "date_utc": "2099-01-01 00:00:00", "git_commit": "f" * 40},
           "engine": old["engine"]}
    res = carry_peers(old, new, ["http", "multiturn"])
    assert res["engine"] is new["engine"] and "carried_from" not in res["engine"]
    origin = res["http"]["carried_from"]
    assert origin == res["multiturn"]["carried_from"] and old["machine"]["date_utc"] in origin
    md = peers_md(res)
    assert md.count(f"from the run of {origin}") == 2 and "2099-01-01" in md
    again = carry_peers(res, {**new, "engine": old["engine"]}, ["http"])  # a second partial run keeps the origin
    assert again["http"]["carried_from"] == origin and "multiturn" not in again
