"""Online load against the HTTP server: Poisson arrivals, latencies as vLLM bench serve
defines them.

Request i is sent at ``t_i = sum of i exponential gaps of mean 1/rate`` (seeded), on a
thread of its own, as a streamed /v1/completions with ``ignore_eos`` and
``return_token_ids`` (so each server-sent event says how many tokens it carries).

    TTFT  = first event with tokens - send
    ITL   = gaps between successive events with tokens (every gap of every request)
    TPOT  = (E2EL - TTFT) / (output tokens - 1)      (requests of two or more tokens;
                                                      model.sampling.time_per_output_token)
    E2EL  = last event - send
    duration = last end - first send; request throughput = completed / duration;
    output throughput = output tokens / duration; goodput = requests meeting every SLO
    (TTFT, TPOT, E2EL in ms) / duration

Each metric: mean, median and p99 in milliseconds (numpy's linear percentile).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

import numpy as np

from ..model.sampling import time_per_output_token


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def stream_one(url: str, prompt: list[int], max_tokens: int, headers: dict,
               timeout: float = 600) -> dict:
    """One streamed completion -> {"send", "events": [(t, n tokens)], "end", "error"}."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "return_token_ids": True})
    out = {"send": time.perf_counter(), "events": [], "error": None}
    try:
        conn.request("POST", "/v1/completions", body,
                     {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
        while out["error"] is None:
            line = resp.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    break
                n = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
                if n:
                    out["events"].append((time.perf_counter(), n))
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    out["end"] = time.perf_counter()
    return out


def run_load(url: str, requests: list[tuple[list[int], int]], rate: float, seed: int = 0,
             headers: dict | None = None) -> list[dict]:
    """Send every (prompt, max_tokens) at its Poisson arrival time; -> per-request results
    in order."""
    arrivals = poisson_arrivals(len(requests), rate, seed)
    results: list[dict | None] = [None] * len(requests)
    t0 = time.perf_counter()

    def go(i):
        delay = t0 + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        results[i] = stream_one(url, *requests[i], headers or {})
    threads = [threading.Thread(target=go, args=(i,), daemon=True)
               for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _summary(values_s: list[float]) -> dict:
    if not values_s:
        return {"mean_ms": None, "median_ms": None, "p99_ms": None}
    v = np.asarray(values_s) * 1e3
    return {"mean_ms": float(v.mean()), "median_ms": float(np.median(v)),
            "p99_ms": float(np.percentile(v, 99))}


def summarize(results: list[dict], slo_ms: dict) -> dict:
    """vLLM bench serve's figures (module docstring) from run_load's results."""
    ok = [r for r in results if r["error"] is None and r["events"]]
    ttft, tpot, itl, e2el, good = [], [], [], [], 0
    for r in ok:
        times = [t for t, _ in r["events"]]
        n = sum(k for _, k in r["events"])
        first, total = times[0] - r["send"], times[-1] - r["send"]
        ttft.append(first)
        e2el.append(total)
        itl += list(np.diff(times))
        per_token = time_per_output_token(total, first, n)
        if per_token is not None:
            tpot.append(per_token)
        meets = {"ttft": first, "tpot": per_token or 0.0, "e2el": total}
        good += all(meets[k] * 1e3 <= limit for k, limit in slo_ms.items())
    start = min(r["send"] for r in results)
    end = max(r["end"] for r in results)
    duration = end - start
    out_tokens = sum(k for r in ok for _, k in r["events"])
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "errors": [r["error"] for r in results if r["error"]][:3],
            "duration_s": duration, "output_tokens": out_tokens,
            "request_throughput": len(ok) / duration,
            "output_tokens_per_s": out_tokens / duration,
            "goodput_requests_per_s": good / duration, "slo_ms": slo_ms,
            "ttft": _summary(ttft), "tpot": _summary(tpot), "itl": _summary(itl),
            "e2el": _summary(e2el)}
