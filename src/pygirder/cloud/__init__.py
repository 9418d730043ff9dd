"""AWS tooling: account setup, template image, artifacts, spot fleet, on-instance agent.

The package is cut by where the code runs:

* on the operator's machine: :mod:`.account` (account setup), :mod:`.fleet` (launch,
  inventory, access, teardown), :mod:`.image` and :mod:`.artifacts`, with
  :mod:`.cli` rendering them as ``pygirder cloud`` commands;
* on the fleet's EC2 instances only: :mod:`.instance` (agent, user-data, boot robot
  and bake script);
* on a laptop standing in for EC2: :mod:`.sim` (data plane, IMDS emulator, rehearsal);
* shared by all of them: :mod:`.errors`, :mod:`.aws` (the one boto3 adaptor: error
  codes, retries), :mod:`.config`, :mod:`.tags`, :mod:`.policy`, :mod:`.pricing`.

boto3 is imported lazily (install with ``pip install 'pygirder[cloud]'``), so the grid
itself never needs it.
"""
