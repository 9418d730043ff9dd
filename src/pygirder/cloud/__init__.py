"""AWS tooling: account setup, template image, artifacts, spot fleet, on-instance agent.

boto3 is imported lazily (install with ``pip install 'pygirder[cloud]'``), so the grid
itself never needs it.
"""
