"""Property-based fuzz of the live app's API: over 1,000 generated calls to a real `python app.py` on loopback.

Every call goes through Gradio's REST API as any client's would: POST /gradio_api/call/ENDPOINT with
{"data": [...]}, then GET the event's SSE stream. The calls go to /generate, /generate_batch and
/variations with their parameters in the order /gradio_api/info lists them. Hostile inputs: boundary,
out-of-range and huge numbers, NaN and Infinity, floats for ints, numbers as text, None, booleans,
lists, dicts, very long text, control characters, lone surrogates, emoji; for the image, malformed file
references and references to files no client uploaded (/etc/passwd, a PNG beside the upload folder,
the server's log, a missing file, a URL).
  * A sweep first: each hostile value aimed at a parameter, and each value of a wrong kind, in every
    parameter of every endpoint, the other inputs valid.
  * Then Hypothesis draws BATCHES x BATCH_SIZE calls: valid ones with up to three inputs hostile, some
    with the data list cut short or lengthened, some sent to another endpoint, some with data not a list.

Every call must get a clear answer: the images (`complete`), an `error` event with a message a person
can act on, or a 4xx refusal of the request. A server error is anything else:
  * an HTTP 5xx, on the POST or on the event stream (or any non-200 on a stream the POST announced);
  * an `error` event without a message (Gradio's answer when an exception other than gr.Error escapes),
    or with app.py's "(reference XXXXXXXX)" of an unexpected exception, or a traceback;
  * no result within CALL_TIMEOUT_S, a stream that ends without one, or the server process dying;
  * a /variations call that completes with a file no client uploaded (the server read it).
All calls run and every server error is reported at once: Hypothesis does not shrink (each call is
already small, and shrinking would replay hundreds of calls against the server). Afterwards the
server must still answer a normal request.
"""

import json
import math
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.options import Options
from model.validation import MAX_PROMPT_CHARS
from support.app_server import AppServer, tiny_app_model

BATCHES = 55  # Hypothesis examples, each a batch of BATCH_SIZE calls run THREADS at a time
BATCH_SIZE = 20
THREADS = 4
MIN_CALLS = 1000
# Generous: a call may wait in the queue behind THREADS - 1 others, each maybe compiling a new shape.
CALL_TIMEOUT_S = 120
MODEL = "tiny"  # the name support.tiny gives its pipeline: the only model served here
KEEP_ROWS = 4  # rows of image tokens in support.tiny's 16-pixel images
MAX_BATCH_PROMPTS = 8  # app.py's default --max-batch-prompts
FILE_META = {"_type": "gradio.FileData"}  # what marks a dict as a file reference in Gradio's API
REFERENCE = re.compile(r"reference [0-9a-f]{8}")  # app.user_errors' tag on an unexpected exception
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------------------------
# The server and the client


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A queue far longer than the THREADS calls in flight: a full queue would be a refusal, not a finding.
    with AppServer(tiny_app_model(tmp_path_factory.getbasetemp()), tmp_path_factory.mktemp("app-fuzz"),
                   "--queue-size", "256") as app:
        yield app


@pytest.fixture(scope="module")
def http(server):
    # A fresh connection per request: a pooled keep-alive connection that the server closes as it is
    # reused reads as "connection reset", a client-side race that would pass for a server error.
    with httpx.Client(base_url=server.url, timeout=CALL_TIMEOUT_S,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


@dataclass
class Images:
    """File references for /variations' image input."""
    uploaded: dict  # an RGB PNG uploaded through /gradio_api/upload: the valid input
    foreign: list  # references to files no client uploaded: the server must refuse to read them
    malformed: list  # references that are not well-formed file data


@pytest.fixture(scope="module")
def images(server, http):
    source = server.log_path.parent / "apple.png"  # beside the upload folder, not in it
    Image.new("RGB", (40, 30), (200, 40, 40)).save(source)
    response = http.post("/gradio_api/upload", files={"files": (source.name, source.read_bytes(), "image/png")})
    response.raise_for_status()
    uploaded = response.json()[0]
    return Images(
        uploaded=_file(uploaded),
        foreign=[_file(str(source)), _file(f"{uploaded}/../../../{source.name}"), _file(str(server.log_path)),
                 _file("/etc/passwd"), _file(f"{uploaded}.missing.png"), _file("http://127.0.0.1:1/apple.png")],
        malformed=[{"path": uploaded}, {"meta": FILE_META}, {}, _file(None), _file(7), _file([uploaded]),
                   {"url": "http://127.0.0.1:1/apple.png", "meta": FILE_META}, uploaded, [_file(uploaded)]],
    )


def _file(path) -> dict:
    return {"path": path, "meta": FILE_META}


def api_parameters(http) -> dict[str, list[str]]:
    """Each endpoint's parameter names in the order its data list takes them, as the server lists them."""
    endpoints = http.get("/gradio_api/info").json()["named_endpoints"]
    return {name: [p["parameter_name"] for p in endpoint["parameters"]] for name, endpoint in endpoints.items()}


# -------------------------------------------------------------------------------------------------
# Inputs, by parameter name ("prompts" stands for /generate_batch's `prompt`, a list)

PROMPTS = st.sampled_from(["a small red apple", "two rockets on a black background"]) | st.text(
    st.characters(categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=40).filter(str.strip)
ODD_STRINGS = ["", "   ", "\x00", "\ud800", "a\udfffb", "\u202e\u200b", "\U0001f469\u200d\U0001f469\u200d\U0001f467",
               "a" * MAX_PROMPT_CHARS, "a" * (MAX_PROMPT_CHARS + 1), "x" * 100_000]
# Values of the wrong kind that the sweep gives every parameter.
WRONG_KINDS = [None, True, math.nan, math.inf, -math.inf, 10**400, "7", "seven", "", [], {}, [1], {"value": 1}]


def in_range(name):
    """An option's valid values: None (the model's default) or a number of its kind in its range."""
    knob = Options.knobs()[name]
    return st.none() | (st.integers(knob.low, knob.high) if knob.kind is int else st.floats(knob.low, knob.high))


def valid_inputs(images: Images) -> dict:
    return {
        **{name: in_range(name) for name in Options.knobs()},
        "prompt": PROMPTS,
        "prompts": st.lists(PROMPTS, min_size=1, max_size=3),
        "image": st.just(images.uploaded),
        "keep_rows": st.none() | st.integers(0, KEEP_ROWS),
        "strength": st.none() | st.floats(0, 1),
        "model": st.sampled_from([None, MODEL]),
    }


def edges(low, high) -> list:
    """The ends of a range, the numbers just outside it (one step and one float ulp away), a value
    between two whole numbers, and the negated top."""
    return [low, high, low - 1, high + 1, math.nextafter(low, -math.inf), math.nextafter(high, math.inf), low + 0.5,
            -high]


def targeted_inputs(images: Images) -> dict:
    """Hostile values aimed at each parameter."""
    prompt = "a small red apple"
    return {
        **{name: edges(knob.low, knob.high) for name, knob in Options.knobs().items()},
        "prompt": ODD_STRINGS,
        "prompts": [[], [[prompt]], prompt, [prompt] * (MAX_BATCH_PROMPTS + 1), [prompt, None], ["\ud800"]],
        "image": images.foreign + images.malformed,
        "keep_rows": edges(0, KEEP_ROWS),
        "strength": edges(0, 1),
        # "mini" and "mega" are offered but cannot load here (no hub): a clear error, not a crash.
        "model": ["mini", "mega", "", "TINY", [MODEL], [MODEL, "mini"]],
    }


# Anything JSON can carry, for any parameter.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from([2**31, 2**53 + 1, 2**63, -(2**63), 2**64, 10**400, -(10**400)]),
    st.sampled_from(["1", " 7 ", "0.5", "1e400", "NaN", "-inf", "0x10", "1_000", "\u0663", "1/2"]),
    st.integers().map(str), st.floats().map(str), st.sampled_from(ODD_STRINGS),
    # Lone surrogates, control and format characters (NUL, bidi overrides, zero-width), emoji, combining marks.
    st.text(st.characters(categories=["Cs", "Cc", "Cf", "Zl", "Zp", "So", "Mn"]), max_size=20))
HOSTILE = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3)


def input_names(endpoint: str, parameters: dict) -> list[str]:
    return ["prompts" if (endpoint, name) == ("/generate_batch", "prompt") else name for name in parameters[endpoint]]


@dataclass
class Call:
    endpoint: str
    data: object  # the data list, or (fuzzed) something else
    changes: str  # which inputs are hostile, and how the data list was reshaped
    reads_foreign_file: bool = False  # a /variations call naming a file no client uploaded: it must not complete

    @classmethod
    def of(cls, endpoint, data, changes, images: Images) -> "Call":
        first = data[0] if isinstance(data, list) and data else None
        return cls(endpoint, data, changes, endpoint == "/variations" and first in images.foreign)


def sweep(parameters: dict, targeted: dict, images: Images):
    """Calls with one hostile input each, the others valid: every targeted value and every wrong kind in
    every parameter of every endpoint, so that none is left to chance."""
    # One image from one candidate keeps the calls that pass cheap; the other knobs take the model's defaults.
    fixed = {"prompt": "a small red apple", "prompts": ["a small red apple", "two rockets"], "image": images.uploaded,
             "num_images": 1, "candidates": 1}
    for endpoint in parameters:
        names = input_names(endpoint, parameters)
        for index, name in enumerate(names):
            for value in targeted[name] + WRONG_KINDS:
                data = [fixed.get(other) for other in names]
                data[index] = value
                yield Call.of(endpoint, data, f"{name} hostile", images)


@st.composite
def calls(draw, parameters: dict, valid: dict, targeted: dict, images: Images) -> Call:
    """A valid call to a random endpoint with up to three inputs hostile; now and then its data list is
    cut short, lengthened, sent to another endpoint, or not a list at all."""
    endpoint = draw(st.sampled_from(sorted(parameters)))
    names = input_names(endpoint, parameters)
    data = [draw(valid[name]) for name in names]
    hostile = draw(st.lists(st.sampled_from(range(len(names))), max_size=3, unique=True))
    for index in hostile:
        # Half the time a value aimed at this parameter: as one more of HOSTILE's branches it would be rare.
        aimed = draw(st.booleans())
        data[index] = draw(st.sampled_from(targeted[names[index]]) if aimed else HOSTILE)
    changes = [f"{names[index]} hostile" for index in hostile]
    # 0-6: as drawn (the simplest draw), 7: cut, 8: lengthened, 9: sent elsewhere, 10: data not a list.
    reshape = draw(st.integers(0, 10))
    if reshape == 7:
        data = data[:draw(st.integers(0, len(data) - 1))]
        changes.append(f"cut to {len(data)} inputs")
    elif reshape == 8:
        data += draw(st.lists(HOSTILE, min_size=1, max_size=3))
        changes.append(f"lengthened to {len(data)} inputs")
    elif reshape == 9:
        changes.append(f"drawn for {endpoint}")
        endpoint = draw(st.sampled_from(sorted(set(parameters) - {endpoint})))
    elif reshape == 10:
        data = draw(SCALARS | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3))
        changes.append("data not a list")
    return Call.of(endpoint, data, ", ".join(changes) or "valid", images)


# -------------------------------------------------------------------------------------------------
# Calls and answers


@dataclass
class Outcome:
    call: Call
    answer: str  # what came back: "complete", "error: <message>", "HTTP 422 on the POST", ...
    problem: str = ""  # why that answer is a server error; empty when it is an acceptable one
    outputs: list = field(default_factory=list)  # a complete call's outputs: [files, record]


def perform(http, call: Call) -> Outcome:
    path = f"/gradio_api/call{call.endpoint}"
    # json.dumps on purpose: it writes NaN and Infinity (not strict JSON, but what Python clients send)
    # and lone surrogates as \ud800 escapes, which is how JSON carries them.
    body = json.dumps({"data": call.data})
    deadline = time.monotonic() + CALL_TIMEOUT_S
    try:
        posted = http.post(path, content=body, headers={"Content-Type": "application/json"})
        if posted.status_code != 200:
            problem = "HTTP 5xx on the POST" if posted.status_code >= 500 else ""
            return Outcome(call, f"HTTP {posted.status_code} on the POST", problem)
        with http.stream("GET", f"{path}/{posted.json()['event_id']}") as stream:
            if stream.status_code != 200:
                return Outcome(call, f"HTTP {stream.status_code} on the stream", "the announced event has no stream")
            event, data = final_event(stream.iter_lines(), deadline)
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return Outcome(call, f"no answer: {error!r}", "no answer")
    if event == "complete":
        return Outcome(call, "complete", "completed with a file no client uploaded" if call.reads_foreign_file else "",
                       data)
    if event == "error":
        message = data.get("error") if isinstance(data, dict) else None
        return Outcome(call, f"error: {message}", error_problem(message))
    return Outcome(call, event or "stream ended", "no result")


def final_event(lines, deadline) -> tuple:
    """The stream's `complete` or `error` event and its data, skipping `generating` and `heartbeat`;
    ("timeout", None) past the deadline, (None, None) when the stream ends without a result."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event in ("complete", "error"):
            return event, json.loads(line.removeprefix("data: "))
        if time.monotonic() > deadline:
            return "timeout", None
    return None, None


def error_problem(message) -> str:
    if not message:
        return "error without a message (an exception other than gr.Error escaped)"
    if REFERENCE.search(message) or "Traceback" in message:
        return "unexpected exception in the server"
    return ""


def report(failures: list[Outcome], server: AppServer, normal: Outcome) -> str:
    """Server errors grouped by cause (for an unexpected exception, the one app.py logged under the
    message's reference), three calls of each, then the server's log tail."""
    log = server.log_path.read_text(errors="replace")
    groups = defaultdict(list)
    for outcome in failures:
        cause = outcome.problem
        if REFERENCE.search(outcome.answer):
            cause += f" ({logged_exception(log, outcome.answer)})"
        groups[cause].append(outcome)
    lines = [f"{len(failures)} server errors:"]
    for cause, group in groups.items():
        lines.append(f"{cause}: {len(group)} calls, e.g.")
        lines += [f"    {outcome.call.endpoint} [{outcome.call.changes}] {_show(outcome.call.data)} -> "
                  f"{_clip(outcome.answer)}" for outcome in group[:3]]
    lines.append(f"Afterwards, a normal /generate: {_clip(normal.answer)}")
    return "\n".join(lines) + f"\n\nServer log (tail):\n{server.log()}"


def logged_exception(log: str, message: str) -> str:
    """The last line (the exception) of the traceback app.user_errors logged under the message's reference."""
    traceback = log.split(f"Request failed ({REFERENCE.search(message).group()}):\n", 1)[-1]
    return next(line for line in traceback.splitlines() if line and not line.startswith((" ", "Traceback")))


def _show(data) -> str:
    """A call's data, each input cut short: a 100,000-character prompt must not hide the others."""
    return f"[{', '.join(_clip(value, 80) for value in data)}]" if isinstance(data, list) else _clip(data)


def _clip(value, limit: int = 300) -> str:
    text = ascii(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# -------------------------------------------------------------------------------------------------
# The test


def test_fuzzed_calls_get_clear_answers_and_the_server_keeps_serving(server, http, images):
    parameters = api_parameters(http)
    valid, targeted = valid_inputs(images), targeted_inputs(images)
    assert set(parameters) == {"/generate", "/generate_batch", "/variations"}
    # A parameter the fuzz does not know would go unfuzzed: teach valid_inputs and targeted_inputs new ones.
    assert {name for endpoint in parameters for name in input_names(endpoint, parameters)} <= set(valid)
    outcomes, drawn = [], 0

    with ThreadPoolExecutor(THREADS) as pool:
        def run(batch):
            outcomes.extend(pool.map(lambda call: perform(http, call), batch))
            assert server.alive(), f"app.py died during these calls:\n{_clip(batch, 3000)}\n\n{server.log()}"

        run(list(sweep(parameters, targeted, images)))

        @settings(max_examples=BATCHES, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
        @given(st.lists(calls(parameters, valid, targeted, images), min_size=BATCH_SIZE, max_size=BATCH_SIZE))
        def run_drawn(batch):
            nonlocal drawn
            drawn += len(batch)
            run(batch)

        run_drawn()

    normal = perform(http, Call("/generate", ["a small red apple", 1, 0, None, None, None, None, None, None], "valid"))
    answers = defaultdict(int)
    for outcome in outcomes:
        answers[outcome.call.endpoint, outcome.answer.split(":")[0]] += 1
    print(f"{len(outcomes)} calls, {drawn} drawn by Hypothesis:", dict(sorted(answers.items())))

    assert drawn >= MIN_CALLS
    failures = [outcome for outcome in outcomes if outcome.problem]
    assert not failures, report(failures, server, normal)
    # Valid calls are part of the mix: every endpoint made images at least once.
    assert {outcome.call.endpoint for outcome in outcomes if outcome.answer == "complete"} == set(parameters)

    assert normal.answer == "complete", f"{normal.answer}\n\n{server.log()}"
    files, record = normal.outputs
    assert len(files) == 1 and record["seed"] == 0
    assert http.get(files[0]["url"]).content.startswith(PNG_SIGNATURE)
