"""The composition root: the CLI, `lambdalake up`, the batch schedule and the supervisor wire
the parts together. Nothing else imports this package."""
