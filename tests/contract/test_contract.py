"""The provider contract: every real provider, through the real server in memory, meets the same checks.

Each check runs once per `cases.CASES` entry against that provider's wire-level fake. A provider
joins by adding its case; a check that needs what the provider does not have (a status endpoint,
an operation it cannot do) is skipped with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flux_mcp.config import Settings
from tests.conftest import as_answered, connect, is_kept, text_of
from tests.contract.cases import CASES, Case, DocumentedError
from tests.contract.conftest import Trace, said, unmasked
from tests.fakes.base import RESET, Entry, FakeBase

pytestmark = pytest.mark.anyio

OTHER_KEY = "atlas-otherkey-6d2f8a4c0e1b3957a7d5"
"""The key of a second provider (Atlas Cloud) configured beside the one under test, never called."""


def _marks(case: Case, check: str, sub: str | None = None) -> list[pytest.MarkDecorator]:
    reason = case.known_bugs.get(f"{check}[{sub}]") if sub else None
    reason = reason or case.known_bugs.get(check)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def each_case(check: str) -> list[Any]:
    """One parameter per provider (expected to fail where its case names a known bug for `check`)."""
    return [pytest.param(case, id=case.id, marks=_marks(case, check)) for case in CASES]


def each_case_and(check: str, values: Callable[[Case], list[tuple[str, Any]]]) -> list[Any]:
    """One parameter per provider and per (id, value) that `values` gives for it."""
    return [
        pytest.param(case, value, id=f"{case.id}-{sub}", marks=_marks(case, check, sub))
        for case in CASES
        for sub, value in values(case)
    ]


def needs_status_endpoint(case: Case) -> str:
    if case.status_check is None:
        pytest.skip(f"{case.id} answers synchronously: it has no status endpoint to check")
    return case.status_check


def native(prediction_id: str) -> str:
    return prediction_id.split(":", 1)[1]


async def generate(settings: Settings, fake: FakeBase, trace: Trace, **args: Any) -> Any:
    async with connect(settings, fake) as client:
        return trace(await client.call_tool("generate_image", {"prompt": "a lighthouse at dusk", **args}))


# --- keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", each_case("missing_key"))
async def test_a_missing_key_names_its_variable_and_nothing_is_sent(
    case: Case, fake: FakeBase, make_settings: Callable[..., Settings], trace: Trace
) -> None:
    settings = make_settings(**case.environment(key=None))
    result = await generate(settings, fake, trace, provider=case.id)
    assert result.is_error and f"set {case.key_var}" in text_of(result), text_of(result)
    assert fake.requests == [] and fake.ledger == []


@pytest.mark.parametrize("case", each_case("wrong_key"))
async def test_a_wrong_key_names_the_variable_is_never_resent_and_never_shown(
    case: Case, fake: FakeBase, make_settings: Callable[..., Settings], trace: Trace
) -> None:
    fake.echo_key = True  # the provider repeats the key it refused
    settings = make_settings(**case.environment(key=case.wrong_key))
    result = await generate(settings, fake, trace)
    assert result.is_error and case.key_var in text_of(result), text_of(result)
    assert case.refused_says in said(result) and case.wrong_key_says in said(result), said(result)
    assert fake.count(case.submit) == 1 and fake.ledger == []
    trace.assert_never_shows(case.wrong_key)


# --- documented errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "error"), each_case_and("documented_errors", lambda case: [(e.id, e) for e in case.errors])
)
async def test_every_documented_error_is_explained_never_resent_and_never_shows_the_key(
    case: Case, error: DocumentedError, fake: FakeBase, settings: Settings, trace: Trace
) -> None:
    fake.echo_key = True  # the error body repeats the key, as careless providers do
    fake.submit_errors.append(error.entry())
    result = await generate(settings, fake, trace, **case.error_args)
    assert result.is_error and error.says in said(result), said(result)
    assert fake.count(case.submit) == 1 and fake.ledger == []
    if case.status_check:
        assert fake.count(case.status_check) == 0
    trace.assert_never_shows(case.key)


# --- refusals before any request ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "refusal"),
    each_case_and(
        "out_of_range",
        lambda case: [
            ("-".join(f"{k}={v}" for k, v in args.items()), (args, says)) for args, says in case.out_of_range
        ],
    ),
)
async def test_an_out_of_range_argument_is_refused_before_any_request(
    case: Case, refusal: tuple[dict[str, Any], str], fake: FakeBase, settings: Settings, trace: Trace
) -> None:
    args, says = refusal
    result = await generate(settings, fake, trace, **args)
    assert result.is_error and says in text_of(result), text_of(result)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("case", "operation"),
    each_case_and(
        "unsupported_operation",
        lambda case: [
            (f"{op}-{others}", (op, others))
            for op in ("edit-url", "edit-file", "upload")
            for others in ("atlascloud-configured", "alone")
        ],
    ),
)
async def test_an_unsupported_operation_names_the_configured_providers_that_can(
    case: Case,
    operation: tuple[str, str],
    fake: FakeBase,
    make_settings: Callable[..., Settings],
    workspace: Path,
    trace: Trace,
) -> None:
    op, others = operation
    verb = op.split("-")[0]
    if case.can_edit if verb == "edit" else case.can_upload:
        pytest.skip(f"{case.id} can {verb} images")
    env = case.environment()
    if others != "alone":
        env |= {"ATLASCLOUD_API_KEY": OTHER_KEY, "ATLASCLOUD_BASE_URL": "http://atlascloud.test"}
    (workspace / "cat.png").write_bytes(b"never read: the refusal comes first")
    async with connect(make_settings(**env), fake) as client:
        if verb == "edit":
            image = "https://example.com/cat.png" if op == "edit-url" else "cat.png"
            result = trace(
                await client.call_tool(
                    "edit_image", {"prompt": "add a hat", "image": image, "provider": case.id}
                )
            )
        else:
            result = trace(await client.call_tool("upload_media", {"path": "cat.png", "provider": case.id}))
    text = text_of(result)
    hint = case.upload_hint if verb == "upload" else None
    if others == "alone":
        can = "No configured provider can; set a key for one of: atlascloud (ATLASCLOUD_API_KEY)"
    else:
        can = "Configured providers that can: atlascloud."
    assert result.is_error and f"{case.label} cannot {verb} images." in text, text
    if hint:  # what to set comes between the refusal and the providers that can
        assert hint in text and can in text, text
    else:
        assert f"cannot {verb} images. {can}" in text, text
    assert fake.requests == []
    trace.assert_never_shows(OTHER_KEY)


# --- check_prediction across a restart ----------------------------------------------------------


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("case", each_case("restart_finished"))
async def test_check_prediction_of_a_finished_job_answers_the_same_after_a_restart(
    case: Case, images: int, fake: FakeBase, settings: Settings, trace: Trace
) -> None:
    async with connect(settings, fake) as client:
        first = trace(await client.call_tool("generate_image", {"prompt": "p", "num_images": images}))
        asked = list(fake.requests)
        pid = first.structured_content["prediction_id"]
        same = trace(await client.call_tool("check_prediction", {"prediction_id": pid}))
    async with connect(settings, fake) as client:  # a new server over the same data folder
        restarted = trace(await client.call_tool("check_prediction", {"prediction_id": pid}))
    assert not first.is_error and first.structured_content["status"] == "succeeded", text_of(first)
    assert len(first.structured_content["images"]) == images
    assert as_answered(same.structured_content) == as_answered(first.structured_content)
    assert as_answered(restarted.structured_content) == as_answered(first.structured_content) and not restarted.is_error
    assert pid in text_of(restarted)
    assert all(is_kept(i["path"]) for i in restarted.structured_content["images"])
    assert fake.requests == asked  # a finished job is answered from the journal
    calls = images if case.one_call_per_image else 1
    assert fake.count(case.submit) == calls and len(fake.ledger) == calls


@pytest.mark.parametrize("case", each_case("restart_pending"))
async def test_check_prediction_finishes_a_pending_job_after_a_restart(
    case: Case, fake: FakeBase, polled_settings: Settings, trace: Trace
) -> None:
    needs_status_endpoint(case)
    assert case.pending is not None
    case.pending(fake)
    async with connect(polled_settings, fake) as client:
        pending = trace(await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0}))
    data = pending.structured_content
    assert not pending.is_error and data["status"] in ("starting", "processing") and data["images"] == []
    assert f'check_prediction with prediction_id="{data["prediction_id"]}"' in text_of(pending)
    fake.finish(native(data["prediction_id"]))  # type: ignore[attr-defined]
    async with connect(polled_settings, fake) as client:  # a new server over the same data folder
        done = trace(
            await client.call_tool(
                "check_prediction", {"prediction_id": data["prediction_id"], "wait_seconds": 5}
            )
        )
        again = trace(await client.call_tool("check_prediction", {"prediction_id": data["prediction_id"]}))
    assert done.structured_content["status"] == "succeeded", text_of(done)
    assert is_kept(done.structured_content["images"][0]["path"])
    assert as_answered(again.structured_content) == as_answered(done.structured_content)
    assert fake.count(case.submit) == 1 and len(fake.ledger) == 1


# --- status checks ----------------------------------------------------------------------------------


def transient(case: Case) -> list[tuple[str, Entry]]:
    return [
        ("503", (503, case.busy_body, {"retry-after": "0"})),
        ("502", (502, "bad gateway", {})),
        ("429", (429, case.busy_body, {"retry-after": "0"})),
        ("connection-reset", RESET),
    ]


@pytest.mark.parametrize(("case", "failure"), each_case_and("transient_status_check", transient))
async def test_transient_status_check_failures_are_retried_and_the_job_finishes(
    case: Case, failure: Entry, fake: FakeBase, polled_settings: Settings, trace: Trace
) -> None:
    status_check = needs_status_endpoint(case)
    if case.polled:
        case.polled(fake)
    fake.poll_errors += [failure, failure]  # two in a row, then the real answer
    result = await generate(polled_settings, fake, trace)
    assert not result.is_error and result.structured_content["status"] == "succeeded", text_of(result)
    assert is_kept(result.structured_content["images"][0]["path"])
    assert fake.poll_errors == [] and fake.count(status_check) == 3
    assert fake.count(case.submit) == 1 and len(fake.ledger) == 1


@pytest.mark.parametrize("case", each_case("key_refused_on_status_check"))
async def test_a_key_refused_on_a_status_check_keeps_the_job_names_the_variable_and_is_not_retried(
    case: Case, fake: FakeBase, polled_settings: Settings, trace: Trace
) -> None:
    status_check = needs_status_endpoint(case)
    assert case.pending is not None
    case.pending(fake)
    async with connect(polled_settings, fake) as client:
        pending = trace(await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0}))
        fake.revoke()  # the key is rotated on the provider's side while the job runs
        fake.echo_key = True
        checked = trace(
            await client.call_tool(
                "check_prediction", {"prediction_id": pending.structured_content["prediction_id"]}
            )
        )
    assert checked.structured_content["status"] == "starting"  # the journal keeps the job and its id
    assert checked.structured_content["prediction_id"] == pending.structured_content["prediction_id"]
    assert case.refused_says in said(checked), said(checked)
    assert fake.count(status_check) == 1 and fake.count(case.submit) == 1 and len(fake.ledger) == 1
    trace.assert_never_shows(case.key)


# --- the key in what a provider reports -----------------------------------------------------------------


@pytest.mark.parametrize("case", each_case("failure_reason"))
async def test_a_failed_job_gives_the_providers_reason_and_never_the_key(
    case: Case, fake: FakeBase, settings: Settings, trace: Trace
) -> None:
    case.fail(fake)
    fake.echo_key = True  # the reason repeats the key
    result = await generate(settings, fake, trace)
    assert result.is_error and result.structured_content["status"] == "failed", text_of(result)
    assert case.fails_with in unmasked(result.structured_content["error"]), result.structured_content["error"]
    assert fake.count(case.submit) == 1 and len(fake.ledger) == 1
    trace.assert_never_shows(case.key)


@pytest.mark.parametrize("case", each_case("result_url"))
async def test_result_urls_that_carry_the_key_never_show_it(
    case: Case, fake: FakeBase, polled_settings: Settings, trace: Trace
) -> None:
    for setup in (case.url_answer, case.polled):
        if setup:
            setup(fake)
    fake.echo_key = True  # the result URLs carry the key in their query
    result = await generate(polled_settings, fake, trace)
    assert not result.is_error and result.structured_content["status"] == "succeeded", text_of(result)
    assert is_kept(result.structured_content["images"][0]["path"])
    trace.assert_never_shows(case.key)
