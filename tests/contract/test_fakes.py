"""The fakes' side of the contract: their key check and their echo of the key work as the suite assumes.

The contract's leak checks pass only if the server scrubs what the fakes repeat; these tests make
sure the fakes do repeat it (a leak check over a fake that echoes nothing could not fail).
"""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from tests.contract.cases import CASES, Case
from tests.fakes.base import RESET, FakeBase

pytestmark = pytest.mark.anyio
PROBE = "/contract-probe"
"""Not an endpoint of any provider: every fake checks the key before it looks at the path."""


def request(case: Case, fake: FakeBase, key: str | None, path: str = PROBE) -> httpx2.Request:
    headers = {fake.key_headers[0]: fake.key_scheme + key} if key is not None else {}
    return httpx2.Request("POST", case.base_url + path, headers=headers, json={})


def steady(answer: Any) -> Any:
    """An answer without the parts that differ on every request (AceDataCloud's `trace_id`)."""
    if isinstance(answer, tuple):
        return tuple(steady(a) for a in answer)
    return {k: v for k, v in answer.items() if k != "trace_id"} if isinstance(answer, dict) else answer


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_the_fake_refuses_a_missing_and_a_wrong_key_in_the_providers_words(case: Case) -> None:
    fake = case.make_fake(case.key)
    missing = await fake.handle(request(case, fake, None))
    wrong = await fake.handle(request(case, fake, case.wrong_key))
    assert (missing.status_code, steady(missing.json())) == steady(fake.unauthorized_answer(None)[:2])
    assert (wrong.status_code, steady(wrong.json())) == steady(fake.unauthorized_answer(case.wrong_key)[:2])
    assert wrong.status_code == 401 and case.wrong_key_says in wrong.text
    assert fake.check_key(request(case, fake, case.key)) is None
    assert fake.requests == [f"POST {PROBE}"] * 2 and fake.ledger == []


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_echo_mode_repeats_the_presented_key_in_refusals_answers_reasons_and_urls(case: Case) -> None:
    fake = case.make_fake(case.key)
    fake.echo_key = True
    refused = await fake.handle(request(case, fake, case.wrong_key))
    assert case.wrong_key in refused.text
    ok = request(case, fake, case.key)
    assert fake.check_key(ok) is None
    for error in case.errors:
        fake.submit_errors.append(error.entry())
        answer = fake.take(fake.submit_errors, ok)
        assert answer is not None and answer.status_code == error.status
        assert case.key in answer.text, error.id
    assert case.key in fake.echoed("the job failed") and case.key in fake.file_url(ok, "x.png")
    fake.echo_key = False
    assert fake.echoed("the job failed") == "the job failed"
    assert fake.file_url(ok, "x.png") == f"{case.base_url}/files/x.png"


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_a_revoked_key_is_refused_and_a_reset_entry_drops_the_connection(case: Case) -> None:
    fake = case.make_fake(case.key)
    fake.revoke()
    refused = await fake.handle(request(case, fake, case.key))
    assert refused.status_code == fake.unauthorized_answer(case.key)[0]
    fake.poll_errors.append(RESET)
    with pytest.raises(httpx2.ReadError):
        fake.take(fake.poll_errors, request(case, fake, case.key))
    assert fake.poll_errors == [] and fake.take(fake.poll_errors, request(case, fake, case.key)) is None
