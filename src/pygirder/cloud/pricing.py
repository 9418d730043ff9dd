"""List prices pygirder uses to show what an account or a fleet costs.

us-east-1 on-demand list prices in USD (other regions differ by a few per cent).
They are estimates for the plan and status tables, never a bill.
"""

# A month is 730 hours.
HOURS_PER_MONTH = 730
PRICE_NAT_GATEWAY_HOUR = 0.045
PRICE_PUBLIC_IPV4_HOUR = 0.005
PRICE_EBS_GB_MONTH = {"gp3": 0.08, "gp2": 0.10, "standard": 0.05}
PRICE_SNAPSHOT_GB_MONTH = 0.05
PRICE_S3_GB_MONTH = 0.023
PRICE_ALARM_MONTH = 0.10
PRICE_INSTANCE_HOUR = {
    "t4g.nano": 0.0042,
    "t4g.micro": 0.0084,
    "t4g.small": 0.0168,
    "t4g.medium": 0.0336,
    "m7g.medium": 0.0408,
    "m6g.medium": 0.0385,
    "t3.nano": 0.0052,
    "t3.micro": 0.0104,
    "t3.small": 0.0208,
    "t3a.nano": 0.0047,
    "t3a.micro": 0.0094,
}
