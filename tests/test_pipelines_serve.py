"""The OpenAI-compatible server on Ray Serve, driven by the official `openai` client.

One Ray cluster and one server for the module (the shipped tiny-m3 and a router trained here);
every served answer is compared with `AdaptiveLMM.generate` offline on the same input.
"""

import base64
import io
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import ray

from data.synthetic import make_split
from m3core.features import feature_names, router_features
from m3core.lmm import NestedLMM
from m3core.shipped import resolve_model
from pipelines.adaptive import AdaptiveLMM
from pipelines.cli import main
from pipelines.serve import BatchAnswerer, ServeConfig, start, stop
from pipelines.serve_api import ApiError, parse_chat_request
from predictor import ScaleRouter, calibration_table, save_calibration
from predictor.drift import drift_reference, save_drift_reference

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

MAX_TOKENS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def message(question: str, *urls: str) -> list[dict]:
    parts = [{"type": "text", "text": question}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts}]


def train_router(lmm: NestedLMM, out) -> None:
    """A router on tiny-m3's own features whose oracle scale varies between samples (a rank
    rule on one feature), calibrated so budgets work, with a drift reference."""
    names = feature_names(lmm)
    column, S = names.index("v1_0"), len(lmm.scales)

    def labelled(split: str):
        rows = make_split(split, 16, seed=3)
        X = router_features(lmm, lmm.encode(rows["image"]), rows["question"])
        rank = np.argsort(np.argsort(X[:, column])) / len(X)
        return X, rank[:, None] < (np.arange(S) + 1)[None, :] / S

    X, correct = labelled("calib")
    router = ScaleRouter("logreg", scales=lmm.scales, policy="threshold", knob=0.5, C=10.0)
    router.fit(X, correct, feature_names=names).save(out)
    X_cal, correct_cal = labelled("train")
    P = router.predict_proba(X_cal)
    save_calibration(calibration_table(P, correct_cal, lmm.scales, None, "threshold"), out)
    save_drift_reference(drift_reference(X_cal, names, lmm.scales, P, "threshold", 0.5), out)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    lmm = NestedLMM.from_pretrained(resolve_model("tiny-m3"), device="cpu")
    train_router(lmm, root / "router")
    allowed = root / "allowed"
    allowed.mkdir()
    rows = make_split("test", 16, seed=0)
    images, questions = list(rows["image"]), list(rows["question"])
    (allowed / "scene.png").write_bytes(png(images[0]))
    (root / "outside.png").write_bytes(png(images[0]))
    (allowed / "link.png").symlink_to(root / "outside.png")

    ray.init(
        num_cpus=2,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    config = ServeConfig(
        model="tiny-m3",
        router=str(root / "router"),
        port=free_port(),
        allow_local_files=str(allowed),
        max_batch_size=16,
        max_body_mb=0.5,
        health_check_period_s=1.0,
    )
    url = start(config)
    offline = AdaptiveLMM(lmm, *load_router(root / "router"), router_dir=root / "router")
    yield SimpleNamespace(
        url=url,
        root=root,
        allowed=allowed,
        offline=offline,
        images=images,
        questions=questions,
        uris=[data_uri(png(image)) for image in images],
        routed=offline.generate(images, questions, max_new_tokens=MAX_TOKENS),
        client=openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60),
    )
    stop(shutdown_ray=True)


def load_router(folder):
    from predictor.calibrate import load_calibration

    return ScaleRouter.load(folder), load_calibration(folder)


def ask(server, i: int, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    extra = {k: kwargs.pop(k) for k in ("scale", "budget") if k in kwargs}
    return server.client.chat.completions.create(
        model=kwargs.pop("model", "adaptive-m3"),
        messages=message(server.questions[i], server.uris[i]),
        extra_body=extra or None,
        **kwargs,
    )


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post_raw(server, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def text_tokens(server, question: str) -> int:
    return len(server.offline.lmm.tokenize([question]).ids[0]) - 1


def test_completion_carries_every_field_and_equals_offline_generate(server):
    expected = server.routed[0]
    out = ask(server, 0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.model == "adaptive-m3"
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == "stop"
    extra = out.model_extra["adaptive"]
    assert extra["scale"] == expected.scale
    assert extra["visual_tokens"] == expected.visual_tokens
    assert extra["routed_by"] == "router" and extra["tried_scales"] == [expected.scale]
    assert extra["confidence"] == pytest.approx(expected.confidence, abs=1e-4)
    assert out.usage.completion_tokens == len(expected.token_ids)
    prompt = text_tokens(server, server.questions[0]) + expected.scale
    assert out.usage.prompt_tokens == prompt
    assert out.usage.total_tokens == prompt + len(expected.token_ids)

    # a fixed scale, and max_tokens cutting the answer short
    offline = server.offline.generate(server.images[:1], server.questions[:1], scale=144)[0]
    fixed = ask(server, 0, scale=144)
    assert fixed.choices[0].message.content == offline.text
    assert fixed.model_extra["adaptive"]["routed_by"] == "fixed"
    assert fixed.usage.prompt_tokens == text_tokens(server, server.questions[0]) + 144
    short = ask(server, 0, scale=144, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1

    # a budget in the body or carried by the model name: the same answers as offline
    tight = server.offline.generate(
        server.images[:8], server.questions[:8], budget="tokens<=2", max_new_tokens=MAX_TOKENS
    )
    loose = server.offline.generate(
        server.images[:8], server.questions[:8], budget="tokens<=100", max_new_tokens=MAX_TOKENS
    )
    assert [r.scale for r in tight] != [r.scale for r in loose]
    for i in range(8):
        by_body = ask(server, i, budget="tokens<=2").model_extra["adaptive"]["scale"]
        by_name = ask(server, i, model="adaptive-m3:tokens<=100").model_extra["adaptive"]
        assert (by_body, by_name["scale"]) == (tight[i].scale, loose[i].scale)

    models = server.client.models.list().data
    assert [m.id for m in models] == ["adaptive-m3"]
    assert models[0].model_extra["scales"] == [1, 9, 36, 144]
    health = get_json(server.url + "/health")
    assert health["status"] == "ok" and health["router"] and health["calibrated"]
    assert health["drift"]["n"] > 0 and {"score", "p_value", "drifted"} <= set(health["drift"])


def test_streaming_sends_openai_chunks_then_done(server):
    expected = server.routed[1]
    chunks = list(ask(server, 1, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].model_extra["adaptive"]["scale"] == expected.scale
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        expected.token_ids
    )
    # the raw stream ends with OpenAI's terminator
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(
            {
                "model": "adaptive-m3",
                "messages": message(server.questions[1], server.uris[1]),
                "stream": True,
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.read().decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_64_concurrent_requests_are_batched_and_equal_offline_generate(server):
    n = len(server.questions)
    assert n == 64
    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(lambda i: ask(server, i), range(n)))
    for answer, expected in zip(answers, server.routed, strict=True):
        assert answer.choices[0].message.content == expected.text
        extra = answer.model_extra["adaptive"]
        assert (extra["scale"], extra["visual_tokens"]) == (expected.scale, expected.visual_tokens)
    batches = [a.model_extra["adaptive"]["batch_size"] for a in answers]
    assert max(batches) > 1, "concurrent requests should share batches"
    assert len({r.scale for r in server.routed}) > 1, "the batch should mix routed scales"


def bad_requests(server) -> dict[str, tuple[bytes, str, str]]:
    """name -> (body, expected code, words the message must contain)."""
    q, uri = server.questions[0], server.uris[0]
    raw = png(server.images[0])

    def body(messages=None, **fields) -> bytes:
        fields = {
            "model": "adaptive-m3",
            "messages": message(q, uri) if messages is None else messages,
            **fields,
        }
        return json.dumps(fields).encode()

    return {
        "no image": (body([{"role": "user", "content": q}]), "no_image", "no image"),
        "two images": (body(message(q, uri, uri)), "too_many_images", "2 images"),
        "corrupt image": (
            body(message(q, data_uri(b"not an image at all"))),
            "invalid_image",
            "corrupt",
        ),
        "truncated image": (body(message(q, data_uri(raw[: len(raw) // 2]))), "invalid_image", ""),
        "not base64": (body(message(q, "data:image/png;base64,@@@")), "invalid_image", "base64"),
        "remote url": (
            body(message(q, "https://example.com/cat.png")),
            "remote_url_refused",
            "never fetched",
        ),
        "path outside": (
            body(message(q, str(server.root / "outside.png"))),
            "path_not_allowed",
            "outside",
        ),
        "dot-dot path": (body(message(q, "../outside.png")), "path_not_allowed", "outside"),
        "symlink out": (
            body(message(q, "file://" + str(server.allowed / "link.png"))),
            "path_not_allowed",
            "",
        ),
        "unknown scale": (body(scale=5), "invalid_scale", "one of this model's scales"),
        "malformed budget": (body(budget="tokens<<3"), "invalid_budget", "cannot parse"),
        "budget on a fixed scale": (body(scale=9, budget="tokens<=9"), None, "needs scale"),
        "empty message": (body([{"role": "user", "content": ""}]), "empty_message", "empty"),
        "no messages": (body([]), "empty_message", "non-empty"),
        "no question": (body(message("  ", uri)), "empty_message", "no question"),
        "oversized body": (body(padding="x" * (600 << 10)), "body_too_large", "larger"),
        "non-JSON body": (b"{this is not json", "invalid_json", "not valid JSON"),
        "image slot in the question": (
            body(message("what <image> is it ?", uri)),
            "bad_question",
            "<image>",
        ),
        "max_tokens too big": (body(max_tokens=10_000), None, "max_tokens"),
    }


def test_bad_requests_get_400_with_openai_error_json_and_serving_goes_on(server):
    for name, (body, code, words) in bad_requests(server).items():
        status, reply = post_raw(server, body)
        assert status == 400, (name, status, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["type"] == "invalid_request_error", name
        assert code is None or error["code"] == code, (name, error)
        assert words.lower() in error["message"].lower(), (name, error)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(server, 0, model="gpt-4o")
    # a file inside the allowed folder is read; the server still answers
    local = server.client.chat.completions.create(
        model="adaptive-m3",
        messages=message(server.questions[0], "scene.png"),
        max_tokens=MAX_TOKENS,
    )
    assert local.choices[0].message.content == server.routed[0].text


def test_bad_request_in_a_shared_batch_fails_alone(server):
    """The batch handler itself, outside Serve: one request the model refuses (ValueError) in
    a batch of four gets its own 400; the other three get offline `generate`'s answers."""
    limits = ServeConfig(model="tiny-m3").limits(server.offline.scales)
    requests = [
        parse_chat_request(
            json.dumps(
                {
                    "model": "adaptive-m3",
                    "max_tokens": MAX_TOKENS,
                    "messages": message(
                        "what <image> is it ?" if i == 2 else server.questions[i], server.uris[i]
                    ),
                }
            ).encode(),
            limits,
        )
        for i in range(4)
    ]
    out = BatchAnswerer(server.offline)(requests)
    assert isinstance(out[2], ApiError) and out[2].status == 400
    assert out[2].code == "bad_question" and "<image>" in out[2].message
    for i in (0, 1, 3):
        assert out[i].text == server.routed[i].text and out[i].scale == server.routed[i].scale


def replica_actors() -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::")
    ]


def test_killed_replica_restarts_and_no_request_hangs(server):
    before = get_json(server.url + "/health")["replica"]
    (name,) = replica_actors()
    client = server.client.with_options(timeout=60, max_retries=0)

    def call(i):
        try:
            return client.chat.completions.create(
                model="adaptive-m3",
                messages=message(server.questions[i], server.uris[i]),
                max_tokens=MAX_TOKENS,
            )
        except openai.APITimeoutError:
            raise
        except (openai.APIStatusError, openai.APIConnectionError) as error:
            return error

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(call, i) for i in range(32)]
        time.sleep(0.3)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        outcomes = [f.result(timeout=120) for f in futures]
    answered = [(i, o) for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
    for i, outcome in answered:
        assert outcome.choices[0].message.content == server.routed[i].text
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert all(getattr(o, "status_code", 500) >= 500 for o in failed), failed
    deadline = time.monotonic() + 90
    while True:  # a new replica takes over
        try:
            after = ask(server, 0)
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            assert time.monotonic() < deadline, "no replica came back"
            time.sleep(0.5)
    assert after.choices[0].message.content == server.routed[0].text
    assert get_json(server.url + "/health")["replica"] != before


def test_cli_serve_answers_and_shuts_down_cleanly_on_sigint(server):
    """`adaptive-m3 serve` redeploys the app on the running Serve instance (same port: a
    fresh controller and proxy would double this module's time), answers, and on SIGINT
    removes its replicas, the controller and the proxy."""
    seen = {}

    def client():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "health" not in seen:
            try:
                health = get_json(server.url + "/health")
                if not health["router"]:  # the new deployment answers
                    seen["health"] = health
            except OSError:
                pass
            time.sleep(0.5)
        seen["answer"] = ask(server, 0, scale=144).choices[0].message.content
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    port = server.url.rsplit(":", 1)[1]
    code = main(["serve", "--model", "tiny-m3", "--port", port, "--gpus-per-replica", "0"])
    thread.join(timeout=10)
    assert code == 0
    assert seen["health"]["calibrated"] is False  # no --router: the confidence cascade
    offline = server.offline.generate(server.images[:1], server.questions[:1], scale=144)[0]
    assert seen["answer"] == offline.text
    assert replica_actors() == []
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/health", timeout=5)
