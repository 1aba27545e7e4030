"""The generation server: a real browser, the JSON API, batching, limits and bad requests.

One `python -m at1_jax.serve` process (tiny random denoiser, tiny CLIP and VAE, 127.0.0.1, a
free port) serves the module; images are compared with what `python -m at1_jax.sample` writes.
"""

import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
from test_sample import save_tiny_denoiser

from at1_jax.model.samplers import SamplerConfig
from at1_jax.serve import cli
from at1_jax.serve.batcher import Batcher, QueueFull

# Wide enough that requests sent together from threads land in one batch on a loaded machine.
WINDOW_MS = 1000
MAX_QUEUED = 8
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: no proxy


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = save_tiny_denoiser(root / "weights")
    model = ["--text-encoder", f"clip={tiny_models.clip}", "--vae", tiny_models.vae,
             "--cache-dir", str(root / "cache")]  # fmt: skip
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "at1_jax.serve", ckpt, *model, "--port", "0",
             "--batch-sizes", "1,4", "--max-images", "8", "--max-queued-images", str(MAX_QUEUED),
             "--batch-window-ms", str(WINDOW_MS)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline, url = time.monotonic() + 180, None
        while url is None:
            first = log.read_text().split("\n")[0]
            if first.startswith("serving ") and first.endswith("/"):
                url = first.split(" at ")[-1]
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            else:
                time.sleep(0.2)
        assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
        yield types.SimpleNamespace(url=url, ckpt=ckpt, model=model, log=log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _call(url: str, body=None, timeout: float = 300):
    """(status, JSON answer, headers) of a GET, or of a POST of `body` (JSON or raw bytes)."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with HTTP.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def _sample(server, out, argv) -> dict[str, bytes]:
    """PNG bytes by file name from `python -m at1_jax.sample ARGV --out out`."""
    run = subprocess.run(
        [sys.executable, "-m", "at1_jax.sample", *argv, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".png")}


def _chromium():
    """Headless Chromium through its chromedriver, or a skip that says how to install them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "no Chromium + chromedriver here; `bash scripts/install_browser.sh` as root (make "
            "test runs it) installs Debian's chromium and chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--no-proxy-server", "--window-size=1280,900"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_the_page_in_a_browser_shows_the_bytes_sample_writes(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium()
    try:
        browser.get(server.url)
        # The form fills its defaults from /info; sampler options come from there too.
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "sampler").text)
        assert browser.find_element(By.ID, "steps").get_attribute("value") == "15"
        # Several prompts at once; blank lines and surrounding spaces are dropped.
        browser.find_element(By.ID, "prompts").send_keys("a red square\n  a blue circle \n\n")
        for field, value in (("num_images", "2"), ("seed", "5"), ("steps", "3")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 300).until(
            lambda b: (
                len(b.find_elements(By.CSS_SELECTOR, "img.result-image")) == 4
                or b.find_element(By.ID, "error").text
            )
        )
        assert browser.find_element(By.ID, "error").text == ""
        shown = [
            (
                img.get_attribute("data-prompt"),
                int(img.get_attribute("data-seed")),
                int(img.get_attribute("data-batch-size")),
                base64.b64decode(img.get_attribute("src").removeprefix("data:image/png;base64,")),
            )
            for img in browser.find_elements(By.CSS_SELECTOR, "img.result-image")
        ]
        results_text = browser.find_element(By.ID, "results").text
        time.sleep(0.3)  # let the images' load handlers size them before the screenshot
        screenshot = tmp_path / "serve_page.png"
        assert browser.save_screenshot(str(screenshot))
        print(f"screenshot of the generation page: {screenshot}")
    finally:
        browser.quit()
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert [(p, s, b) for p, s, b, _ in shown] == [
        ("a red square", 5, 4),
        ("a red square", 6, 4),
        ("a blue circle", 5, 4),
        ("a blue circle", 6, 4),
    ]  # fmt: skip  (4 images: one call at compiled batch size 4)
    for text in ("a red square", "a blue circle", "seed 6", "steps 3", "guidance 6"):
        assert text in results_text
    written = _sample(
        server,
        tmp_path / "sample",
        [
            "--checkpoint", server.ckpt, *server.model,
            "--prompt", "a red square", "--prompt", "a blue circle",
            "--num-images", "2", "--seed", "5", "--steps", "3", "--batch-size", "4",
        ],
    )  # fmt: skip
    assert [png for *_, png in shown] == [written[f"{i:05d}.png"] for i in range(4)]


@pytest.mark.slow
def test_requests_arriving_together_share_one_call_and_later_ones_do_not_compile(server, tmp_path):
    _, before, _ = _call(server.url + "stats")
    bodies = [
        {"prompts": [prompt], "num_images": 1, "seed": seed, "steps": 2}  # steps 2: new here
        for prompt, seed in (("a cat", 1), ("a dog", 2), ("a tree", 3))
    ]
    answers = [None] * len(bodies)

    def send(i):
        answers[i] = _call(server.url + "generate", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [a[0] for a in answers] == [200, 200, 200], answers
    batch = answers[0][1]["batch"]
    assert [a[1]["batch"] for a in answers] == [batch] * 3  # one batch for the three
    assert batch["requests"] == 3 and batch["images"] == 3
    assert batch["batch_sizes"] == [4]  # one jitted call, padded from 3 to 4
    assert batch["xla_compiles"] >= 1  # the steps-2 program compiled in that call
    assert [(a[1]["images"][0]["prompt"], a[1]["images"][0]["seed"]) for a in answers] == [
        ("a cat", 1), ("a dog", 2), ("a tree", 3)
    ]  # fmt: skip
    _, after, _ = _call(server.url + "stats")
    assert after["programs"] == before["programs"] + 1  # one sampler program for all three

    # Another size in the same bucket, other prompts and seeds: no compile at all.
    body = {"prompts": ["a house", "the sky"], "num_images": 2, "seed": 7, "steps": 2}
    status, again, _ = _call(server.url + "generate", body)
    assert status == 200 and again["batch"]["id"] > batch["id"]
    assert again["batch"]["batch_sizes"] == [4] and again["batch"]["xla_compiles"] == 0
    assert _call(server.url + "stats")[1]["programs"] == after["programs"]

    # The command the server gives for an image remakes it byte for byte.
    image = again["images"][3]
    assert (image["prompt"], image["seed"], image["batch_size"]) == ("the sky", 8, 4)
    argv = shlex.split(image["sample_command"])
    assert argv[:3] == ["python", "-m", "at1_jax.sample"]
    written = _sample(server, tmp_path / "remake", argv[3:])
    assert written["00000.png"] == base64.b64decode(image["png_base64"])


BAD_REQUESTS = [
    ({"prompts": ["   "]}, ["prompts.0", "at least 1 character"]),
    ({"prompts": []}, ["prompts: give at least one prompt"]),
    ({"num_images": 2}, ["prompts: Field required"]),
    ({"prompts": ["x"], "steps": 0}, ["steps", "greater than or equal to 1", "got 0"]),
    (b'{"prompts": ["x"], "guidance": NaN}', ["guidance", "finite number", "got nan"]),
    ({"prompts": ["x"], "guidance": -1}, ["guidance", "got -1"]),
    ({"prompts": ["x"], "sampler": "euler"}, ["sampler", "'dpmpp2m' or 'ddim'", "'euler'"]),
    ({"prompts": ["x"], "num_images": 10000}, ["10000 images", "limit of 8", "--max-images"]),
    ({"prompts": ["x", "y", "z"], "num_images": 3}, ["9 images", "--max-images"]),
    ({"prompts": ["x"], "steps": 101}, ["101 steps", "limit of 100", "--max-steps"]),
    ({"prompts": ["x"], "seed": -1}, ["seed", "got -1"]),
    ({"prompts": ["x"], "num_images": "2"}, ["num_images", "valid integer"]),
    ({"prompts": ["x"], "step": 3}, ["step", "Extra inputs"]),
    (b"a red square", ["not valid JSON"]),
    (b'["a red square"]', ["send one JSON object"]),
]


@pytest.mark.slow  # the module's server: ~30 s to start with the tiny models
def test_bad_requests_get_a_4xx_that_says_why_and_the_server_keeps_serving(server):
    _, before, _ = _call(server.url + "stats")
    for body, words in BAD_REQUESTS:
        status, answer, _ = _call(server.url + "generate", body, timeout=30)
        assert status == 422, (body, answer)
        assert all(w in answer["error"] for w in words), (body, answer["error"])
    _, after, _ = _call(server.url + "stats")
    assert after["batches"] == before["batches"] and after["queued_images"] == 0  # no work
    status, answer, _ = _call(server.url + "generate", {"prompts": ["a red square"], "steps": 3})
    assert status == 200 and len(answer["images"]) == 4  # default: 4 images per prompt
    assert [im["seed"] for im in answer["images"]] == [11, 12, 13, 14]  # default seed 11


@pytest.mark.slow
def test_a_full_queue_answers_503_and_serves_again_once_drained(server):
    full = {"prompts": ["a small dog"], "num_images": MAX_QUEUED, "steps": 4}
    answers = []
    sender = threading.Thread(target=lambda: answers.append(_call(server.url + "generate", full)))
    sender.start()
    deadline = time.monotonic() + 60
    while _call(server.url + "stats")[1]["queued_images"] < MAX_QUEUED:
        assert time.monotonic() < deadline, "the first request was never queued"
        time.sleep(0.02)
    # Queued for at least the 1 s gathering window, then compiling steps 4: still held.
    status, answer, headers = _call(server.url + "generate", {"prompts": ["x"], "num_images": 1})
    assert status == 503 and headers["Retry-After"] == "1"
    assert f"limit of {MAX_QUEUED}" in answer["error"] and "--max-queued-images" in answer["error"]
    sender.join(300)
    assert answers[0][0] == 200 and len(answers[0][1]["images"]) == MAX_QUEUED
    assert answers[0][1]["batch"]["batch_sizes"] == [4, 4]  # 8 images: two calls at size 4
    status, answer, _ = _call(server.url + "generate", {"prompts": ["x"], "num_images": 1})
    assert status == 200 and answer["images"][0]["batch_size"] == 1


def test_batcher_groups_by_settings_and_pads_each_call_to_the_smallest_size_that_fits():
    calls = []

    def run(prompts, seeds, sampler, size):
        calls.append((len(prompts), sampler.steps, size))
        return [f"{p}/{s}/{size}".encode() for p, s in zip(prompts, seeds, strict=True)]

    batcher = Batcher(run, [4, 16, 1], max_queued_images=64, window_s=5.0)
    two, three = SamplerConfig(steps=2), SamplerConfig(steps=3)
    try:
        futures = [
            batcher.submit(["p"] * 5, list(range(5)), two),
            batcher.submit(["q"], [9], three),
            batcher.submit(["r"] * 14, list(range(14)), two),  # 20 queued >= 16: no wait
        ]
        first, second, third = (f.result(timeout=60) for f in futures)
    finally:
        batcher.close()
    # Steps 2 (first asked): 19 images as 16 + 3 padded to 4; steps 3: 1 image at size 1.
    assert calls == [(16, 2, 16), (3, 2, 4), (1, 3, 1)]
    assert [im.png for im in second.images] == [b"q/9/1"]
    assert [im.png for im in first.images] == [f"p/{s}/16".encode() for s in range(5)]
    assert [im.png for im in third.images] == [f"r/{s}/16".encode() for s in range(11)] + [
        f"r/{s}/4".encode() for s in range(11, 14)
    ]
    assert first.batch is third.batch and first.batch["requests"] == 2
    assert first.batch["batch_sizes"] == [16, 4] and second.batch["batch_sizes"] == [1]


def test_batcher_bounds_queued_images_and_survives_a_failing_call():
    release = threading.Event()

    def run(prompts, seeds, sampler, size):
        assert release.wait(30)
        if "bad" in prompts:
            raise ValueError("text encoder gives 12-d vectors")
        return [b"png"] * len(prompts)

    batcher = Batcher(run, [4], max_queued_images=4, window_s=0.0)
    try:
        held = batcher.submit(["bad"] * 3, [0, 1, 2], SamplerConfig())
        with pytest.raises(QueueFull, match=r"3 images are queued .* adds 2.*--max-queued-images"):
            batcher.submit(["a", "b"], [0, 1], SamplerConfig())
        one = batcher.submit(["a"], [0], SamplerConfig(steps=3))  # 3 + 1 fits; its own call
        release.set()
        with pytest.raises(ValueError, match="12-d"):
            held.result(timeout=60)
        assert [im.png for im in one.result(timeout=60).images] == [b"png"]
        after = batcher.submit(["a", "b"], [0, 1], SamplerConfig())  # room again
        assert len(after.result(timeout=60).images) == 2
        assert batcher.stats()["queued_images"] == 0
    finally:
        batcher.close()


def test_cli_refuses_bad_settings_before_serving(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nowhere"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "not found" in err
    argv = [str(tmp_path / "nowhere"), "--max-images", "8", "--max-queued-images", "4"]
    assert cli.main(argv) == 2
    assert "--max-queued-images 4 is less than --max-images 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path), "--batch-sizes", "0,4"])
    assert "sizes >= 1" in capsys.readouterr().err
