"""The example project: web analytics in the spirit of SuperWebAnalytics.com."""

from lambdalake.events import EventSchema
from lambdalake.monoids import ApproxDistinct, Count, DistinctSet, Quantiles, Sum
from lambdalake.project import Project
from lambdalake.views import View

PAGEVIEW = EventSchema(
    "pageview",
    {"url": "string", "user_id": "string", "referrer": "string?", "duration_ms": "int?"},
)
# Money is exact: `amount` was a float before; master data written then is read with a cast
# to decimal(18,2) (`lambdalake.evolution`).
PURCHASE = EventSchema(
    "purchase", {"user_id": "string", "sku": "string", "amount": "decimal(18,2)"}
)

project = Project.of(
    schemas=[PAGEVIEW, PURCHASE],
    views=[
        View(
            name="pageviews_by_url_hour",
            event_type="pageview",
            keys=("url",),
            bucket="hour",
            metrics={"pageviews": Count(), "visitors": ApproxDistinct("user_id")},
        ),
        View(
            name="revenue_by_sku_day",
            event_type="purchase",
            keys=("sku",),
            bucket="day",
            metrics={"revenue": Sum("amount"), "orders": Count()},
        ),
        View(
            name="durations_by_url_hour",
            event_type="pageview",
            keys=("url",),
            bucket="hour",
            metrics={"duration_ms": Quantiles("duration_ms"), "viewers": DistinctSet("user_id")},
        ),
        View(
            name="buyers_by_sku_day",
            event_type="purchase",
            keys=("sku",),
            bucket="day",
            metrics={"buyers": DistinctSet("user_id")},
        ),
    ],
)
