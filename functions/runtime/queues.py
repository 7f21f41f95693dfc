"""SQS event-source mappings on an AWS-compatible endpoint (moto here), as AWS Lambda polls a queue.

The template's queues are created as declared (visibility timeout, redrive policy to a
dead-letter queue with its `maxReceiveCount`). A mapping receives up to `BatchSize` messages,
invokes the function with the SQS event, and deletes what succeeded: with
`ReportBatchItemFailures`, every message but those the answer's `batchItemFailures` names;
without it, all or (the invocation failed) none. A message not deleted becomes visible again
after the visibility timeout and is received again; the queue itself moves it to its dead-letter
queue once received `maxReceiveCount` times, as SQS does.

An S3 event notification reaches a function the same way here: the runtime points the bucket's
notifications at a queue of its own (`<function>-s3`) and invokes the function with each
message's S3 event; a notification that fails is retried as AWS retries an asynchronous
invocation (`EventInvokeConfig.MaximumRetryAttempts`, 2), then kept in the on-failure queue the
template names (else `<function>-s3-failed`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from lambdalake.functions.runtime.context import REGION
from lambdalake.functions.runtime.function import FunctionError, LocalFunction, Throttled
from lambdalake.functions.runtime.polling import Polling
from lambdalake.functions.runtime.template import BucketSource, Queue, QueueSource
from lambdalake.loops import Loops

log = logging.getLogger("lambdalake.functions.queues")
_WAIT_SECONDS = 1  # long polling: an idle queue costs one request a second


class Queues:
    """The template's queues, created on the endpoint: logical id -> (url, arn)."""

    def __init__(self, client: Any, queues: dict[str, Queue]):
        self.client = client
        self.urls: dict[str, str] = {}
        self.arns: dict[str, str] = {}
        dead_letter_queues_first = sorted(queues.items(),
                                          key=lambda item: item[1].dead_letter_queue is not None)
        for resource, queue in dead_letter_queues_first:
            attributes = {"VisibilityTimeout": str(queue.visibility_timeout_seconds)}
            if queue.dead_letter_queue is not None:
                attributes["RedrivePolicy"] = json.dumps({
                    "deadLetterTargetArn": self.arns[queue.dead_letter_queue],
                    "maxReceiveCount": queue.max_receive_count})
            self.create(resource, attributes, queue.name)

    def create(self, resource: str, attributes: dict[str, str], name: str = "") -> None:
        """Create the queue (`name`, by default its logical id `resource`) if missing."""
        url = self.client.create_queue(QueueName=name or resource,
                                       Attributes=attributes)["QueueUrl"]
        self.urls[resource] = url
        self.arns[resource] = self.client.get_queue_attributes(
            QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def sqs_record(message: dict[str, Any], arn: str) -> dict[str, Any]:
    """A received message as the SQS event's record."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message.get("Attributes", {}),
        "messageAttributes": {
            name: {"stringValue": value.get("StringValue"), "binaryValue": value.get("BinaryValue"),
                   "stringListValues": [], "binaryListValues": [],
                   "dataType": value["DataType"]}
            for name, value in message.get("MessageAttributes", {}).items()
        },
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": REGION,
    }


Deliver = Callable[[list[dict[str, Any]]], set[str]]  # messages -> ids of those that failed


class QueueMapping(Polling):
    def __init__(self, function: LocalFunction, client: Any, url: str, arn: str,
                 batch_size: int, deliver: Deliver, loops: Loops | None = None):
        self.function, self.client, self.url, self.arn = function, client, url, arn
        self.batch_size, self.deliver = min(batch_size, 10), deliver
        super().__init__(f"queue-{function.name}", loops)

    def poll_once(self) -> int:
        """Receive one batch, deliver it, delete what succeeded; the messages received."""
        messages = self.client.receive_message(
            QueueUrl=self.url, MaxNumberOfMessages=self.batch_size, WaitTimeSeconds=_WAIT_SECONDS,
            AttributeNames=["All"], MessageAttributeNames=["All"]).get("Messages", [])
        if not messages:
            return 0
        failed = self.deliver(messages)
        done = [m for m in messages if m["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            self.client.delete_message_batch(QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(done[start:start + 10])])
        return len(messages)


def sqs_delivery(function: LocalFunction, source: QueueSource, arn: str) -> Deliver:
    """Deliver a batch as one SQS event; the ids the function reports failed."""

    def deliver(messages: list[dict[str, Any]]) -> set[str]:
        every = {m["MessageId"] for m in messages}
        try:
            result = function.invoke({"Records": [sqs_record(m, arn) for m in messages]})
        except (FunctionError, Throttled) as error:
            log.warning("queue batch failed; redelivered after the visibility timeout",
                        extra={"function": function.name, "error": str(error)})
            return every
        if not source.partial_failures:
            return set()
        failures = (result or {}).get("batchItemFailures", [])
        return {f["itemIdentifier"] for f in failures} & every

    return deliver


def s3_delivery(function: LocalFunction) -> Deliver:
    """Deliver each message's S3 event notification as its own invocation."""

    def deliver(messages: list[dict[str, Any]]) -> set[str]:
        failed = set()
        for message in messages:
            try:
                event = json.loads(message["Body"])
                if event.get("Event") == "s3:TestEvent":  # sent once, as notifications are set
                    continue
                function.invoke(event)
            except (FunctionError, Throttled, ValueError, AttributeError) as error:
                log.warning("S3 notification failed; retried", extra={
                    "function": function.name, "error": str(error)})
                failed.add(message["MessageId"])
        return failed

    return deliver


def notify_queue(s3: Any, queues: Queues, function: LocalFunction, source: BucketSource,
                 bucket: str) -> str:
    """Point `bucket`'s notifications at a queue of the function's; the queue's name."""
    name = f"{function.name}-s3"
    invocation = function.spec.asynchronous
    failed = invocation.on_failure_queue or f"{name}-failed"
    if failed not in queues.arns:
        queues.create(failed, {})
    queues.create(name, {"VisibilityTimeout": "1", "RedrivePolicy": json.dumps({
        "deadLetterTargetArn": queues.arns[failed],
        "maxReceiveCount": invocation.max_retries + 1})})
    events = [source.events] if isinstance(source.events, str) else source.events
    configuration: dict[str, Any] = {"Id": f"lambdalake-{function.name}",
                                     "QueueArn": queues.arns[name], "Events": events}
    if source.filter:
        configuration["Filter"] = {"Key": {"FilterRules": source.filter["S3Key"]["Rules"]}}
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [configuration]})
    return name
