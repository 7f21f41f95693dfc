"""The SAM template's rollback alarms, generated: every function's `live` alias is rolled
back by its own Errors and Throttles alarms (its `DeploymentPreference` names them), alike
but for the function and its `Condition`. They are written, in the functions' order, between
the template's two marker comments (`lambdalake functions alarms`); tests/test_deploy.py
checks the template holds what this writes.
"""

from __future__ import annotations

from typing import Any

from lambdalake.functions.runtime.template import cloudformation

BEGIN = ("  # Written by `lambdalake functions alarms`, a pair a function (edit that, not this):\n"
         "  # a new version's errors or throttles on the live alias roll the deployment back.\n")
END = "  # End of the written alarms.\n"
METRICS = ("Errors", "Throttles")
_ALARM = """\
  {function}{metric}Alarm:
    Type: AWS::CloudWatch::Alarm
{condition}    Properties:
      AlarmDescription: {function} {what} on the live alias - rolls a deployment back.
      Namespace: AWS/Lambda
      MetricName: {metric}
      Dimensions:
        - {{Name: FunctionName, Value: !Ref {function}}}
        - {{Name: Resource, Value: !Sub "${{{function}}}:live"}}
      Statistic: Sum
      Period: 60
      EvaluationPeriods: 1
      Threshold: 0
      ComparisonOperator: GreaterThanThreshold
      TreatMissingData: notBreaching
"""


class TemplateError(ValueError):
    pass


def alarm(function: str, metric: str, condition: str | None) -> str:
    return _ALARM.format(function=function, metric=metric, what=metric.lower(),
                         condition=f"    Condition: {condition}\n" if condition else "")


def alarms(document: dict[str, Any]) -> str:
    """The alarms of every function of the template, in its order."""
    return "".join(alarm(name, metric, resource.get("Condition"))
                   for name, resource in document.get("Resources", {}).items()
                   if resource.get("Type") == "AWS::Serverless::Function"
                   for metric in METRICS)


def with_alarms(text: str) -> str:
    """The template's text with its alarms written anew between the markers."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise TemplateError("the template has no place for its alarms: add the marker "
                            f"comments {BEGIN.splitlines()[0].strip()!r} ... {END.strip()!r} "
                            "to its Resources")
    return head + BEGIN + alarms(cloudformation(text)) + END + tail
