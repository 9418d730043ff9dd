"""Account-level AWS resources for pygirder: plan, setup, status, teardown.

The engine is :mod:`.kind` (the Kind protocol and the run context) and :mod:`.model`
(the report); one module per service family holds its kinds (:mod:`.iam`, :mod:`.s3`,
:mod:`.messaging`, :mod:`.keys`, :mod:`.network`, :mod:`.nat`, :mod:`.billing`);
:mod:`pygirder.cloud.leftovers` finds what fleet and image commands left behind; :mod:`.verbs`
holds the commands and :mod:`.resources` what the fleet needs from a set-up account.

Every resource kind is a small class with the same verbs: ``find`` it by tag,
``check`` it against the config (drift), ``create``, ``update``, ``delete``, and its
idle ``monthly_usd``.  The kinds are listed once, in dependency order, by
:func:`account_kinds`; :func:`plan`, :func:`setup`, :func:`status` and
:func:`teardown` walk that list and return a :class:`Report` that the CLI renders.

Rules every kind follows:

* **Discovered by tag, every run.**  Nothing is remembered locally (the cluster's
  private key file aside).  A resource is pygirder's only if it carries
  ``pygirder:managed=true`` and ``pygirder:name=<name>``; something else holding one
  of pygirder's names is a *conflict*: setup stops before creating anything, and
  nothing pygirder did not create is ever adopted, changed or deleted.
* **Converge.**  Setup creates what is missing, fixes what drifted, and does nothing
  when everything is as configured.  More than one of a singular resource is
  reported as a leak, not silently picked from.
* **Tagged at birth.**  Resources are tagged in the call that creates them; the one
  exception (S3 buckets are tagged right after creation) is rolled back if tagging
  fails.
* **Bounded waits.**  AWS is eventually consistent: waits for instance-profile
  propagation, NAT readiness and deletions poll with a limit, and teardown retries
  ``DependencyViolation`` with backoff.
"""

from __future__ import annotations

from .keys import ensure_key_pair, read_public_key
from .model import Action, Item, Report
from .nat import nat_user_data
from .resources import account_resources, start_nat, stop_nat
from .verbs import fleet_instances, plan, setup, status, teardown, verify_clean

__all__ = [
    "Action",
    "Item",
    "Report",
    "account_resources",
    "ensure_key_pair",
    "fleet_instances",
    "nat_user_data",
    "plan",
    "read_public_key",
    "setup",
    "start_nat",
    "status",
    "stop_nat",
    "teardown",
    "verify_clean",
]
