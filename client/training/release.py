"""One training request on a site, in the order the site's guarantee needs.

1. The site's policy against the run config, and the request's own fields: refused before any data is
   read or any state is touched (:func:`client.training.site_policy.check_run`).
2. With the state directory held exclusively: the run's state restored, a released round answered
   from the store (or refused), the lifetime spend of every run read.
3. The round (:func:`client.training.round.run_round`), and its release recorded durably before the reply
   leaves. A round that fails after reading data is recorded and charged too, and never retried.

``client/training/app.py`` only unpacks the message and calls :func:`handle_train`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from client.training.privacy_state import STATE_KEY, SitePrivacyState
from client.training.round import RoundFailed, run_round
from client.training.site_data import SiteSpec, load_site_tensors
from client.training.site_keys import site_signing_key
from client.training.site_policy import PolicyRefusal, SitePolicy, check_run
from client.training.site_store import Release, SiteStore, events_of
from common.config import RunSettings
from common.errors import ConfigError
from common.privacy.entry import check_id
from common.privacy.events import DpSgdEvent
from common.privacy.site_record import PREVIOUS_PREFIX
from common.serde import arrays_digest

MAX_ROUND = 1_000_000


@dataclass(frozen=True)
class Request:
    """A training request's fields, validated before anything else happens."""

    run_id: str
    server_round: int
    model_hash: str


def parse_request(content: RecordDict, site_index: int) -> Request:
    """The run id, round and model hash of a training message.

    Raises:
        PolicyRefusal: a run id or round that is not well formed (setting ``request``).
    """
    config = content.config_records.get("config", ConfigRecord())
    server_round, run_id = config.get("server-round"), config.get("run-id", "")
    if (
        isinstance(server_round, bool)
        or not isinstance(server_round, int)
        or not 1 <= server_round <= MAX_ROUND
    ):
        raise PolicyRefusal(
            site_index, "request", f"server-round {server_round!r} is not an integer 1..{MAX_ROUND}"
        )
    try:
        check_id("run id", run_id)
    except ConfigError as exc:
        raise PolicyRefusal(site_index, "request", str(exc)) from None
    if "arrays" not in content.array_records:
        raise PolicyRefusal(site_index, "request", "the message carries no model arrays")
    digest = arrays_digest(content.array_records["arrays"])
    return Request(str(run_id), server_round, digest)


def handle_train(
    content: RecordDict,
    state: RecordDict,
    settings: RunSettings,
    node_config: Mapping[str, object],
    site: SiteSpec,
    policy: SitePolicy,
    store: SiteStore | None,
    *,
    deployed: bool,
) -> RecordDict:
    """Answer one training request; return the reply content.

    Raises:
        FacefedError: a refusal (policy, budget, replay, state) or a charged failure; nothing is
            released.
    """
    budget = check_run(policy, settings, site.site_index, deployed=deployed)
    request = parse_request(content, site.site_index)
    if store is None:
        if deployed:
            raise PolicyRefusal(
                site.site_index,
                "state-dir",
                "a deployed site needs a state-dir to account its lifetime budget",
            )
        return _release(content, state, settings, node_config, site, policy, budget, request, [])
    with store.locked():
        store.restore(state, request.run_id)
        stored = store.replay(request.run_id, request.server_round, request.model_hash)
        if stored is not None:
            return stored
        lifetime = store.lifetime()
        own = [r for r in lifetime if r.run_id == request.run_id]
        _agree_with_lifetime(state, settings, own)
        other_runs = events_of([r for r in lifetime if r.run_id != request.run_id])
        try:
            reply = _release(
                content,
                state,
                settings,
                node_config,
                site,
                policy,
                budget,
                request,
                other_runs,
                store,
                released_without_dp=any(not r.private for r in lifetime),
            )
        except RoundFailed as failed:  # charged: the failure came after the data was read
            charged = Release(
                request.run_id, request.server_round, failed.events, failed.secret_noise
            )
            store.commit(charged, request.model_hash, state, RecordDict())
            raise
        for number, record in store.previous_records(request.run_id, request.server_round).items():
            reply.config_records[f"{PREVIOUS_PREFIX}{number}"] = record
        return reply


def _release(
    content: RecordDict,
    state: RecordDict,
    settings: RunSettings,
    node_config: Mapping[str, object],
    site: SiteSpec,
    policy: SitePolicy,
    budget: float,
    request: Request,
    other_runs: list[DpSgdEvent],
    store: SiteStore | None = None,
    released_without_dp: bool = False,
) -> RecordDict:
    if store is None or "site-key" in node_config:
        signing_key = site_signing_key(state, node_config)
    else:
        signing_key = store.signing_key()
    release = run_round(
        arrays=content.array_records["arrays"],
        train_config=content.config_records["config"],
        state=state,
        data=load_site_tensors(settings, site),
        settings=settings,
        budget=budget,
        site_index=site.site_index,
        signing_key=signing_key,
        model_hash=request.model_hash,
        policy=policy,
        other_runs=other_runs,
        released_without_dp=released_without_dp,
    )
    if store is not None:
        # Durable before the reply can leave: a crash after this point is answered by a replay.
        done = Release(
            request.run_id,
            request.server_round,
            release.events,
            release.secret_noise,
            private=release.private,
        )
        store.commit(done, request.model_hash, state, release.content)
    return release.content


def _agree_with_lifetime(state: RecordDict, settings: RunSettings, own: list[Release]) -> None:
    """Make the run's restored history the one the lifetime record holds for it.

    The lifetime is the authority: a run whose own state files were pruned (four other runs since)
    must not come back with an empty history and a fresh run budget, nor with another run's history
    that happens to have the same rounds.
    """
    accountant = settings.privacy.accountant
    privacy = SitePrivacyState.load(state, accountant)
    rounds, events = [r.round for r in own], events_of(own)
    if privacy.rounds == rounds and privacy.history == events:
        return
    with contextlib.suppress(KeyError):
        del state[STATE_KEY]
    SitePrivacyState(
        accountant=accountant,
        noise_multiplier=events[0].noise_multiplier if events else None,
        history=events,
        rounds=rounds,
    ).save(state)
