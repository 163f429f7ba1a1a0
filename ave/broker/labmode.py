"""A broker in a lab: its clients' requests, the sessions it hosts, its turn to decide.

With ``"lab"`` in broker.json a broker keeps its own equipment (registered in etcd by
its ``LabAgent``) and plays three parts, all driven by changes of the lab's keys:

* for its clients, it publishes each ``get`` as a request, waits for the decision,
  then for the sessions that host what was granted, and answers the client with
  them; ``yield_resources`` and a client leaving delete the client's holds;
* for its equipment, it hosts a session per job holding some of it (whichever
  broker that job's client is connected to), adds and removes resources as holds
  come and are let go, deletes a let-go hold once the item is reset, and publishes
  each such session's address and key for the job's broker;
* when elected, it runs the lab's ``Decider`` and commits its decisions.

What it shows (who, queue, equipment) is read from its mirror of the lab, so every
broker lists the whole lab.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from ave.broker.allocator import Key
from ave.broker.exceptions import LabUnavailable
from ave.broker.state import Client, SessionRecord
from ave.exceptions import AveException, exception_factory
from ave.lab.agent import LabAgent
from ave.lab.decider import Decider, Decision, ItemRef, refine
from ave.lab.etcd import Compare, Op, TxnResult
from ave.network.rpc import Reply

if TYPE_CHECKING:
    from ave.broker.server import BrokerServer

log = logging.getLogger(__name__)


class LabMode:
    """The lab side of one broker."""

    def __init__(self, server: BrokerServer, lab: dict, host: str) -> None:
        self.server = server
        self.host = host
        self.name = lab['name']
        self.agent = LabAgent(server, lab, host, self.changed, self._registration,
                              self._local_items)
        self.keys = self.agent.keys
        self.decider = Decider(server.types, server.config['queue']['aging_s'],
                               server.config['queue']['limit'])
        self.jobs: dict[int, str] = {}              # client holder -> job
        self.numbers: dict[str, int] = {}           # job -> last request number
        self.pending: dict[tuple[str, int], tuple[Reply, Client]] = {}
        self.hosted: dict[str, SessionRecord] = {}  # job -> session on this host
        self.owned: dict[ItemRef, str] = {}         # item hosted here -> job
        self.revisions: dict[ItemRef, int] = {}     # ... -> revision of its hold
        self.resetting: dict[Key, ItemRef] = {}     # items let go, being reset here
        self._dropping: dict[ItemRef, int] = {}     # holds being deleted (revision)
        self.voided: dict[ItemRef, int] = {}        # holds a fence ended (revision)
        self._published: dict[str, dict] = {}       # sessions as last put, by job
        self._deadline_at: float | None = None

    # -- joining and leaving -----------------------------------------------------------

    def join(self, lease: int | None = None) -> None:
        self.agent.join(lease)
        self.changed()

    def _registration(self) -> dict:
        server = self.server
        return {'address': [self.host, server.port], 'pid': server.pid,
                'version': server.status()['version'], 'stacks': server.config['stacks'],
                'started': time.time()}

    def _local_items(self) -> list[tuple[str, dict]]:
        """This host's equipment as the lab lists it: each profile names the host."""
        allocator = self.server.allocator
        return [(key[1], {**dict(item.profile), 'host': self.host})
                for key, item in allocator.items.items()
                if not allocator.types[key[0]].on_demand]

    def equipment_changed(self) -> None:
        self.agent.publish_items()

    def leave(self) -> None:
        self.agent.leave()

    # -- whenever the lab changed ------------------------------------------------------

    def changed(self) -> None:
        """Run every part's reaction to the lab's current keys (idempotent)."""
        if self.agent.fenced:
            self._end_hosted('its lease can no longer be proven')
        else:
            self._host()
        self._settle_requests()
        if self.agent.mirror.leader() is None:
            self.agent.campaign()
        if self.agent.leader:
            self._decide()
        self.server.status_page.changed()

    # -- the client's side -------------------------------------------------------------

    def get(self, client: Client, request: list, wait: float | None,
            priority: int) -> None:
        """Publish the request; the reply is deferred until it is decided and the
        sessions are up."""
        if not self.agent.available:
            raise LabUnavailable(f'the lab {self.name!r} is unreachable: etcd has not '
                                 f'answered for {self.agent.ttl / 2:g} s or more; no '
                                 'new allocation until it does')
        job = self.job_of(client)
        if wait != 0:
            self._check_may_wait(job)
        number = self.numbers[job] = self.numbers.get(job, 0) + 1
        value = {'profiles': request, 'wait': wait, 'priority': priority,
                 'arrived': time.time(), 'host': self.host}
        identity = {'broker': self.host, 'holder': client.describe()}
        reply = self.server.defer()
        self.pending[(job, number)] = (reply, client)

        def failed(error: BaseException) -> None:
            self.pending.pop((job, number), None)
            reply.fail(LabUnavailable(f'the request could not be published: {error}'))
        self.agent.txn([], [Op.put(self.keys.job(job), json.dumps(identity),
                                   lease=self.agent.lease),
                            Op.put(self.keys.request(job, number), json.dumps(value),
                                   lease=self.agent.lease)],
                       self.agent._ignore, failed)

    def job_of(self, client: Client) -> str:
        job = self.jobs.get(client.holder)
        if job is None:
            job = self.jobs[client.holder] = secrets.token_hex(8)
        return job

    def _check_may_wait(self, job: str) -> None:
        held = [f'{kind} {identity}' for (host, kind, identity), hold
                in self.agent.mirror.holds().items()
                if hold['job'] == job and not hold.get('yielded')
                and not self.server.types[kind].on_demand]
        if held:
            raise AveException('a client holding equipment may not wait for more (it '
                               f'could deadlock with another); it holds {", ".join(held)}')

    def _settle_requests(self) -> None:
        """Answer each pending get that was refused, or granted with its sessions up."""
        mirror = self.agent.mirror
        for (job, number), (reply, client) in list(self.pending.items()):
            refusal = mirror.decisions_of(job).get(number)
            if refusal is not None:
                self._refused(job, number, reply, refusal.get('error', {}))
                continue
            holds = mirror.holds_of(job, number)
            if not holds:
                continue
            resources = self._sessions_for(job, [hold['profile'] for hold in holds])
            if isinstance(resources, AveException):
                self._refused(job, number, reply, resources.details)
            elif resources is not None:
                del self.pending[(job, number)]
                self.server.allocations_total += 1
                reply.result({'resources': resources})

    def _sessions_for(self, job: str, granted: list[dict]) -> list | AveException | None:
        """Each granted resource with its session, once every host published that it
        hosts this very hold (not an earlier one of the same job and item)."""
        mirror = self.agent.mirror
        sessions = mirror.sessions_of(job)
        brokers = mirror.brokers()
        resources = []
        for profile in granted:
            host = str(profile.get('host'))
            identity = _identity_of(profile, self.server)
            session = sessions.get(host)
            if host not in brokers:
                return AveException(f'{host} left the lab before its session was up')
            hold = mirror.get(self.keys.hold(host, str(profile.get('type')), identity))
            if session is None or hold is None or \
                    session.get('holds', {}).get(identity) != hold.mod_revision:
                return None
            resources.append({'profile': profile, 'session': session['address'],
                              'authkey': session['authkey']})
        return resources

    def _refused(self, job: str, number: int, reply: Reply, error: dict) -> None:
        """A failed get frees everything the client held, as on a lone broker."""
        del self.pending[(job, number)]
        self._let_go(job, [Op.delete(self.keys.decision(job, number))])
        reply.fail(exception_factory(error))

    def yield_resources(self, client: Client, profiles: list[dict]) -> None:
        job = self.jobs.get(client.holder)
        holds = self.agent.mirror.holds()
        refs = []
        for profile in profiles:
            ref = (str(profile.get('host')), str(profile.get('type')),
                   _identity_of(profile, self.server))
            hold = holds.get(ref, {})
            if hold.get('job') != job or hold.get('yielded'):
                raise AveException(f'not held by this client: {profile}')
            refs.append(ref)
        reply = self.server.defer()
        self.agent.txn([], self._yield_ops(refs, holds),
                       lambda result: self.agent.once_seen(result.revision,
                                                           lambda: reply.result(None)),
                       reply.fail)

    def _yield_ops(self, refs: list[ItemRef], holds: dict[ItemRef, dict]) -> list[Op]:
        """Mark holds let go: each item's host resets it, then deletes the hold."""
        return [Op.put(self.keys.hold(*ref), json.dumps({**holds[ref], 'yielded': True}),
                       lease=self.agent.lease) for ref in refs]

    def allocations_of(self, client: Client) -> list[dict]:
        job = self.jobs.get(client.holder)
        return [hold.get('profile', {}) for hold in self.agent.mirror.holds().values()
                if hold['job'] == job and not hold.get('yielded')]

    def client_left(self, client: Client) -> None:
        job = self.jobs.pop(client.holder, None)
        if job is None:
            return
        self.numbers.pop(job, None)
        for key in [key for key in self.pending if key[0] == job]:
            del self.pending[key]
        self._let_go(job, [Op.delete_prefix(f'{self.keys.prefix}requests/{job}/'),
                           Op.delete_prefix(f'{self.keys.prefix}decisions/{job}/'),
                           Op.delete(self.keys.job(job))])

    def _let_go(self, job: str, more: list[Op]) -> None:
        """Yield everything ``job`` holds (and do ``more`` in the same transaction)."""
        holds = self.agent.mirror.holds()
        refs = [ref for ref, hold in holds.items()
                if hold['job'] == job and not hold.get('yielded')]
        self.agent.txn([], self._yield_ops(refs, holds) + more, self.agent._ignore,
                       lambda error: log.warning('lab: could not let job %s go: %s', job,
                                                 error))

    # -- the host's side: sessions for the holds on its equipment ----------------------

    def _host(self) -> None:
        """Make this host's sessions match the holds on its equipment."""
        mirror = self.agent.mirror
        holds = {ref: hold for ref, hold in mirror.holds().items() if ref[0] == self.host}
        for ref, job in list(self.owned.items()):
            hold = holds.get(ref)
            if hold is None or hold['job'] != job or hold.get('yielded'):
                self._unhost(ref, job)
        self._dropping = {ref: revision for ref, revision in self._dropping.items()
                          if ref in holds}
        self._forget_voided()
        for ref, hold in holds.items():
            if hold.get('yielded'):
                if ref not in self.resetting.values():
                    self._drop_hold(ref)  # nothing here to reset (a restart's leftover)
            elif ref in self.voided:
                self._drop_voided(ref)
            elif ref not in self.owned:
                self._host_item(ref, hold)
            if ref in self.owned:
                entry = mirror.get(self.keys.hold(*ref))
                self.revisions[ref] = 0 if entry is None else entry.mod_revision
        jobs = mirror.jobs()
        for job in [job for job in self.hosted if job not in jobs
                    and job not in self.owned.values()]:
            self.server.keeper.close(self.hosted.pop(job))
        self._publish_sessions()

    def _host_item(self, ref: ItemRef, hold: dict) -> None:
        server = self.server
        _, kind, identity = ref
        equipment_type = server.types.get(kind)
        if equipment_type is None:
            return
        key: Key = (kind, identity)
        if equipment_type.on_demand and key not in server.allocator.items:
            profile = {k: v for k, v in hold.get('profile', {}).items() if k != 'host'}
            server.allocator.add(profile, server.allocator.type_settings.get(kind, {}))
        item = server.allocator.items.get(key)
        if item is None or item.holder is not None or item.releasing:
            return  # not ours (any more), or still being reset: its reset retries
        job = hold['job']
        record = self.hosted.get(job)
        if record is None:
            record = self.hosted[job] = server.keeper.open()
        assert record.link is not None
        item.holder, item.since = job, hold.get('since')
        record.keys.add(key)
        self.owned[ref] = job
        server.notify(record.link, 'add_resource', dict(item.profile), item.settings,
                      item.tainted)

    def _unhost(self, ref: ItemRef, job: str) -> None:
        """The hold was let go (or went): reset the item in its session; the hold is
        deleted once the reset is done."""
        server = self.server
        del self.owned[ref]
        self.revisions.pop(ref, None)
        key = (ref[1], ref[2])
        record = self.hosted.get(job)
        item = server.allocator.items.get(key)
        if item is None or item.holder != job:
            return
        server.allocator.begin_release(key)
        self.resetting[key] = ref
        if record is not None and record.link is not None and not record.link.closed:
            server.notify(record.link, 'remove_resource', dict(item.profile))
        else:
            server.released_item(key, clean=False)

    def released(self, key: Key) -> None:
        """A session finished resetting an item: its hold goes, and the lab may give
        the item out again."""
        ref = self.resetting.pop(key, None)
        if ref is not None:
            self._drop_hold(ref)
        self.server.call_later(0, self.changed)  # a hold waiting for this reset

    def _drop_hold(self, ref: ItemRef) -> None:
        entry = self.agent.mirror.get(self.keys.hold(*ref))
        if entry is None or not entry.value.get('yielded'):
            return  # gone already (its job's broker died), or held anew meanwhile
        self._delete_hold(ref, entry.mod_revision, 'a hold stays after a reset')

    def _forget_voided(self) -> None:
        """Void holds that went (deleted, expired) or were replaced by a new grant
        need nothing more."""
        mirror = self.agent.mirror
        for ref, revision in list(self.voided.items()):
            entry = mirror.get(self.keys.hold(*ref))
            if entry is None or entry.mod_revision != revision:
                del self.voided[ref]

    def _drop_voided(self, ref: ItemRef) -> None:
        """Delete a hold whose session a fence ended, if it is still that hold."""
        if self._dropping.get(ref) != self.voided[ref]:
            log.info('lab: %s %s: letting go of the hold whose session the fence ended',
                     ref[1], ref[2])
        self._delete_hold(ref, self.voided[ref], 'a void hold stays for now')

    def _delete_hold(self, ref: ItemRef, revision: int, if_not: str) -> None:
        """Delete the hold on ``ref`` if it is still at ``revision`` (once: a delete
        under way is not sent again; a failed one is, at the next change)."""
        if self._dropping.get(ref) == revision:
            return  # on its way out
        self._dropping[ref] = revision
        key = self.keys.hold(*ref)

        def failed(error: BaseException) -> None:
            log.warning('lab: %s: %s', if_not, error)
            self._dropping.pop(ref, None)
        self.agent.txn([Compare.mod_revision(key, revision)], [Op.delete(key)],
                       self.agent._ignore, failed)

    def session_ended(self, record: SessionRecord) -> None:
        """A hosted session died: its job loses what it held here (the broker has the
        items reset), and its client hears of it at its next call, as on a lone broker."""
        jobs = [job for job, hosted in self.hosted.items() if hosted is record]
        if not jobs:
            return
        job = jobs[0]
        del self.hosted[job]
        for ref in [ref for ref, owner in self.owned.items() if owner == job]:
            del self.owned[ref]
            self.revisions.pop(ref, None)
            self.resetting[(ref[1], ref[2])] = ref

    def _end_hosted(self, why: str) -> None:
        """End every session hosted here (fenced). The holds they served are void:
        once etcd answers again they are deleted, not hosted anew, so the job (whose
        proxies lost their session) no longer holds the items and others may have
        them; a job's hold that its broker's lease kept would otherwise leave the
        item held by a session nobody can reach."""
        for ref, job in list(self.owned.items()):
            log.warning('lab: ending the session of job %s on %s %s: %s', job, ref[1],
                        ref[2], why)
            entry = self.agent.mirror.get(self.keys.hold(*ref))
            if entry is not None:
                self.voided[ref] = entry.mod_revision
            self._unhost(ref, job)
        for job in list(self.hosted):
            self.server.keeper.close(self.hosted.pop(job))

    def _publish_sessions(self) -> None:
        """Put each hosted job's session (address, key, which holds it hosts) where
        the job's broker reads it; drop those no longer hosted."""
        mirror = self.agent.mirror
        wanted: dict[str, dict] = {
            job: {'address': [self.host, record.port], 'authkey': record.authkey,
                  'holds': {}} for job, record in self.hosted.items()}
        for ref, job in self.owned.items():
            wanted[job]['holds'][ref[2]] = self.revisions.get(ref, 0)
        ops = []
        for job, entry in wanted.items():
            current = mirror.get(self.keys.session(job, self.host))
            if (current is None or current.value != entry) and \
                    self._published.get(job) != entry:
                ops.append(Op.put(self.keys.session(job, self.host), json.dumps(entry),
                                  lease=self.agent.lease))
        for item in mirror.of_kind('sessions'):
            if item.parts[2] == self.host and item.parts[1] not in wanted \
                    and item.parts[1] in self._published:
                ops.append(Op.delete(self.keys.session(item.parts[1], self.host)))
        self._published = wanted
        if ops and self.agent.lease is not None:
            self.agent.txn([], ops, self.agent._ignore, self._not_published)

    def _not_published(self, error: BaseException) -> None:
        log.warning('lab: sessions not published: %s', error)
        self._published = {}  # the next change tries again

    # -- the leader's side -------------------------------------------------------------

    def _decide(self) -> None:
        now = time.time()
        mirror = self.agent.mirror
        decisions = self.decider.decide(mirror, now)
        if decisions:
            table = self.decider.table(mirror)
            for decision in decisions:
                refine(decision, table.items)
                self._commit(decision, now)
        self._arm_deadline(now)

    def _commit(self, decision: Decision, now: float) -> None:
        """One transaction: the request goes and, granted, becomes its holds (each
        item still registered and held by nobody), or, refused, its refusal."""
        request = decision.request
        keys = self.keys
        compare = [Compare.exists(keys.request(request.job, request.number))]
        success = [Op.delete(keys.request(request.job, request.number))]
        if decision.error is not None:
            success.append(Op.put(keys.decision(request.job, request.number),
                                  json.dumps({'error': decision.error}),
                                  lease=request.lease))
        holder = self.agent.mirror.jobs().get(request.job, {}).get('holder', {})
        for position, (ref, profile) in enumerate(zip(decision.refs, decision.granted)):
            if not self.server.types[ref[1]].on_demand:
                compare += [Compare.missing(keys.hold(*ref)), Compare.exists(keys.item(*ref))]
            success.append(Op.put(keys.hold(*ref), json.dumps(
                {'job': request.job, 'request': request.number, 'position': position,
                 'broker': request.host, 'holder': holder, 'since': now,
                 'profile': profile, 'yielded': False}), lease=request.lease))

        def done(result: TxnResult) -> None:
            self.decider.settled(decision, result.succeeded)
            if not result.succeeded:  # the mirror was behind: decide again
                self.decider.seen.discard((request.job, request.number))
                self.changed()

        def failed(error: BaseException) -> None:
            log.warning('lab: a decision could not be committed: %s', error)
            self.decider.settled(decision, False)
            self.decider.seen.discard((request.job, request.number))
        self.agent.txn(compare, success, done, failed)

    def _arm_deadline(self, now: float) -> None:
        deadline = self.decider.next_deadline()
        if deadline is None or (self._deadline_at is not None and self._deadline_at <= deadline):
            return
        self._deadline_at = deadline

        def due() -> None:
            self._deadline_at = None
            if self.agent.leader:
                self._decide()
        self.server.call_later(max(0.0, deadline - now), due)

    # -- what people see ---------------------------------------------------------------

    def who(self) -> list[dict]:
        jobs = self.agent.mirror.jobs()
        return [{'profile': hold.get('profile', {}),
                 'holder': dict(jobs.get(hold['job'], {}).get('holder') or {}),
                 'since': hold.get('since')}
                for hold in self.agent.mirror.holds().values() if not hold.get('yielded')]

    def equipment(self) -> list[dict]:
        mirror = self.agent.mirror
        holds, jobs = mirror.holds(), mirror.jobs()
        rows = []
        for host, profile in mirror.items():
            kind = str(profile.get('type'))
            identity = _identity_of(profile, self.server)
            hold = holds.get((host, kind, identity))
            state = ('releasing' if hold and hold.get('yielded') else 'held' if hold
                     else 'offline' if profile.get('power_state') == 'offline'
                     else 'available')
            rows.append({'profile': profile, 'state': state,
                         'holder': None if hold is None else
                         dict(jobs.get(hold['job'], {}).get('holder') or {}),
                         'since': None if hold is None else hold.get('since')})
        return rows

    def queue(self) -> list[dict]:
        mirror = self.agent.mirror
        jobs = mirror.jobs()
        aging = self.decider.queue.aging_s or 0.0
        now = time.time()
        waiting = [(data.get('arrived', now) - data.get('priority', 0) * aging, job, data)
                   for job, number, data, _ in mirror.requests()]
        waiting.sort(key=lambda entry: (entry[0], entry[1]))
        return [{'position': position,
                 'holder': dict(jobs.get(job, {}).get('holder') or {}),
                 'profiles': data.get('profiles'), 'priority': data.get('priority', 0),
                 'waited_s': max(0.0, now - data.get('arrived', now))}
                for position, (_, job, data) in enumerate(waiting, 1)]

    # -- handing over ------------------------------------------------------------------

    def export(self, index_of: Any) -> dict:
        return {'lease': self.agent.lease,
                'jobs': {str(holder): job for holder, job in self.jobs.items()},
                'numbers': self.numbers,
                'pending': [[job, number, index_of(reply.connection)]
                            for (job, number), (reply, _) in self.pending.items()],
                'hosted': {job: record.pid for job, record in self.hosted.items()},
                'owned': [[*ref, job, self.revisions.get(ref, 0)]
                          for ref, job in self.owned.items()],
                'resetting': [[*key, *ref] for key, ref in self.resetting.items()]}

    def adopt(self, data: dict, connections: list) -> None:
        """Take the predecessor's jobs, hosted sessions and owed replies; its lease is
        continued by ``join``."""
        server = self.server
        self.jobs = {int(holder): job for holder, job in data['jobs'].items()}
        self.numbers = dict(data['numbers'])
        for job, pid in data['hosted'].items():
            record = server.state.session(pid)
            if record is not None:
                self.hosted[job] = record
        self.owned = {(host, kind, identity): job
                      for host, kind, identity, job, _ in data['owned']}
        self.revisions = {(host, kind, identity): revision
                          for host, kind, identity, _, revision in data['owned']}
        self.resetting = {(kind, identity): (ref_host, ref_kind, ref_identity)
                          for kind, identity, ref_host, ref_kind, ref_identity
                          in data['resetting']}
        for job, number, peer in data['pending']:
            connection = None if peer is None else connections[peer]
            reply = None if connection is None else server.owed_reply(connection)
            client = None if connection is None else server.state.client(connection)
            if reply is not None and client is not None:
                self.pending[(job, number)] = (reply, client)

    def let_go(self) -> None:
        self.agent.let_go()


def _identity_of(profile: dict, server: BrokerServer) -> str:
    kind = server.types.get(str(profile.get('type')))
    return '' if kind is None else str(profile.get(kind.identity, ''))
