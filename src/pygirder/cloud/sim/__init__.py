"""The local stand-in for EC2: a data plane that runs "instances" as processes.

:mod:`.simulator` turns moto's instances into local processes that boot the real
user-data; :mod:`.imds` is the IMDSv2 each one sees; :mod:`.siminit` their init
process; :mod:`.rehearse` runs setup, ``up``, a job, ``down`` and ``teardown``
against moto with them.
"""
