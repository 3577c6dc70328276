"""Load test for `nanovlm serve`: requests/s and tokens/s at several client concurrencies, or a
soak that samples the server's memory over time.

Starts the server itself on loopback (a separate process, so the clients do not share its
interpreter) from --model DIR, or from a tiny random checkpoint when no model is given; or
measures a running server with --url. Each client is a thread with one keep-alive connection
sending easy-VQA questions with an image (greedy). Bounded: every level stops after
--requests-per-client requests per client or --max-seconds, whichever comes first.

    python benchmarks/serve_load.py                      # tiny random model
    python benchmarks/serve_load.py --preset easyvqa     # random model of the demo's size
    python benchmarks/serve_load.py --model runs/demo/final
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,4,16
    python benchmarks/serve_load.py --model runs/demo/final --soak 1800 --clients 32

--soak SECONDS: --clients clients (every second one streaming) ask without pause for that long,
while the server's resident memory (RSS, from /proc; with --url, give --pid) is sampled every
--sample-every seconds into a table: a server that leaks keeps growing, a healthy one levels off.

Prints markdown tables; no timed assertions.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse


def random_checkpoint(directory: str, preset: str) -> str:
    """A randomly initialised checkpoint of a preset's size (no backbone download)."""
    import torch

    from nanovlm import VLMConfig, VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset(preset), load_backbone=False)
    path = os.path.join(directory, preset)
    model.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nanovlm", "serve", "--model", model_dir, "--port", str(port),
           "--max-batch-size", str(max_batch_size)]
    log = tempfile.TemporaryFile("w+")  # not a pipe: a long run's log would fill it and stall the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited: {log.read()[-2000:]}")
        try:
            if get_json(url, "/health")["status"] == "ok":
                return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not come up within 120 s")


def get_json(url: str, path: str) -> dict:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def workload(n: int) -> list[dict]:
    """n (image, question) chat messages from the easy-VQA test split (drawn shapes without it)."""
    try:
        from easy_vqa import get_test_image_paths, get_test_questions
    except ImportError:
        return [_message(_drawn_png(i), "what shape is in the image?") for i in range(n)]
    questions, _, image_ids = get_test_questions()
    paths = get_test_image_paths()
    out = []
    for i in range(n):
        with open(paths[image_ids[i]], "rb") as f:
            out.append(_message(f.read(), questions[i]))
    return out


def _message(png: bytes, question: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def _drawn_png(i: int) -> bytes:
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((8 + i % 16, 8, 48, 40 + i % 16), fill=((37 * i) % 256, 90, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def ask(conn: http.client.HTTPConnection, body: dict, stream: bool) -> int:
    """One chat completion on `conn`; its completion tokens (streamed: from the usage chunk)."""
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise ValueError(f"status {response.status}")
    if not stream:
        return json.loads(payload)["usage"]["completion_tokens"]
    events = [e[len(b"data: "):] for e in payload.split(b"\n\n") if e.startswith(b"data: {")]
    return json.loads(events[-1])["usage"]["completion_tokens"]


class Clients:
    """`clients` threads asking without pause (every `stream_every`-th one streaming) until each
    has sent `per_client` requests or `seconds` have passed; counts what came back."""

    def __init__(self, url: str, model: str, messages: list[dict], max_tokens: int, stream_every: int = 0):
        self.url, self.model, self.messages, self.max_tokens = urllib.parse.urlsplit(url), model, messages, max_tokens
        self.stream_every = stream_every
        self.latencies: list[float] = []
        self.tokens = self.errors = 0
        self.lock = threading.Lock()

    def run(self, clients: int, per_client: int, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(k, per_client, deadline)) for k in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    def _client(self, k: int, per_client: int, deadline: float) -> None:
        stream = bool(self.stream_every) and k % self.stream_every == self.stream_every - 1
        conn = None
        for j in range(per_client):
            if time.monotonic() > deadline:
                break
            conn = conn or http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=120)
            body = {"model": self.model, "messages": [self.messages[(k * 7919 + j) % len(self.messages)]],
                    "max_tokens": self.max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            try:
                n = ask(conn, body, stream)
            except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException):
                n = None
                conn.close()
                conn = None
            with self.lock:
                if n is None:
                    self.errors += 1
                else:
                    self.latencies.append(time.perf_counter() - t0)
                    self.tokens += n
        if conn is not None:
            conn.close()


def run_level(url: str, model: str, messages: list[dict], clients: int, per_client: int, max_tokens: int,
              max_seconds: float) -> dict:
    load = Clients(url, model, messages, max_tokens)
    before = get_json(url, "/health")
    wall = load.run(clients, per_client, max_seconds)
    after = get_json(url, "/health")
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    rows = after.get("decode_rows", 0) - before.get("decode_rows", 0)
    lat = sorted(load.latencies)
    return {
        "clients": clients, "requests": len(lat), "errors": load.errors, "wall_s": wall,
        "req_s": len(lat) / wall, "tok_s": load.tokens / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
        "mean_batch": rows / steps if steps else float("nan"),
    }


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def soak(url: str, model: str, messages: list[dict], pid: int, args) -> list[dict]:
    """RSS and answers every --sample-every seconds while --clients clients ask for --soak seconds."""
    load = Clients(url, model, messages, args.max_tokens, stream_every=2)
    worker = threading.Thread(target=load.run, args=(args.clients, 1 << 30, args.soak))
    samples = [{"t": 0.0, "rss_mb": rss_mb(pid), "answers": 0, "errors": 0}]
    t0 = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(max(0.0, t0 + len(samples) * args.sample_every - time.monotonic()))
        samples.append({"t": time.monotonic() - t0, "rss_mb": rss_mb(pid), "answers": len(load.latencies),
                        "errors": load.errors})
    return samples


def print_soak(samples: list[dict], args, model_desc: str) -> None:
    print(f"`nanovlm serve` soak: {model_desc}; {args.clients} clients (half streamed), image + question, greedy, "
          f"max_tokens={args.max_tokens}, {args.soak:g} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| time s | server RSS MB | answers | errors |\n|---:|---:|---:|---:|")
    for s in samples:
        print(f"| {s['t']:.0f} | {s['rss_mb']:.0f} | {s['answers']} | {s['errors']} |")
    half = samples[len(samples) // 2:]
    if len(half) > 1:
        print(f"\nRSS over the second half: {half[0]['rss_mb']:.0f} -> {half[-1]['rss_mb']:.0f} MB "
              f"({half[-1]['rss_mb'] - half[0]['rss_mb']:+.0f} MB); peak {max(s['rss_mb'] for s in samples):.0f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory to serve (default: a random model of --preset)")
    src.add_argument("--url", help="measure an already running server instead")
    ap.add_argument("--preset", default="tiny", help="size of the random model served when --model is not given")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="time cap per concurrency level")
    ap.add_argument("--max-batch-size", type=int, default=16, help="passed to the server it starts")
    ap.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="run the soak instead of the levels")
    ap.add_argument("--clients", type=int, default=32, help="clients of the soak")
    ap.add_argument("--sample-every", type=float, default=60.0, metavar="SECONDS", help="the soak's RSS samples")
    ap.add_argument("--pid", type=int, default=None, help="with --url and --soak: the server's process id")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if args.soak and args.url and args.pid is None:
        ap.error("--soak with --url needs --pid, the server's process id (its memory is read from /proc).")

    proc, tmp = None, None
    try:
        if args.url:
            url, model_desc = args.url.rstrip("/"), args.url
        else:
            model_dir = args.model
            if model_dir is None:
                tmp = tempfile.TemporaryDirectory()
                model_dir = random_checkpoint(tmp.name, args.preset)
                model_desc = f"{args.preset} preset, random weights"
            else:
                model_desc = model_dir
            proc, url = start_server(model_dir, args.max_batch_size)
        model = get_json(url, "/v1/models")["data"][0]["id"]
        messages = workload(max(levels + [args.clients]) * args.requests_per_client)
        run_level(url, model, messages, 1, 1, args.max_tokens, args.max_seconds)  # warm-up
        if args.soak:
            samples = soak(url, model, messages, args.pid or proc.pid, args)
        else:
            results = [run_level(url, model, messages, c, args.requests_per_client, args.max_tokens,
                                 args.max_seconds) for c in levels]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()

    if args.soak:
        print_soak(samples, args, model_desc)
        return 0
    print(f"`nanovlm serve` load: {model_desc}; easy-VQA image + question, greedy, max_tokens={args.max_tokens}, "
          f"{args.requests_per_client} requests per client; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| clients | requests | errors | wall s | requests/s | completion tokens/s | p50 latency s | "
          "p95 latency s | mean decode batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['wall_s']:.2f} | {r['req_s']:.2f} | "
              f"{r['tok_s']:.1f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['mean_batch']:.2f} |")
    base = results[0]["req_s"] if results and results[0]["clients"] == 1 else None
    if base:
        print("\nspeed-up over one client: " + ", ".join(f"{r['clients']} clients x{r['req_s'] / base:.1f}"
                                                          for r in results[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
