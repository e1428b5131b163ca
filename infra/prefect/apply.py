"""Apply the semid alerts (infra/prefect/automations.yaml) to the Prefect server of PREFECT_API_URL.

Saves the Webhook block `semid-alerts` (the URL from --webhook-url or SEMID_ALERT_WEBHOOK_URL), points every
call-webhook action at it, and creates each automation, or updates the one of the same name: applying again
changes nothing else, so it is safe to run after every edit of the file or change of URL.

    python infra/prefect/apply.py --webhook-url https://hooks.slack.com/services/...
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

AUTOMATIONS = Path(__file__).with_name("automations.yaml")
WEBHOOK_BLOCK = "semid-alerts"
WEBHOOK_URL_ENV = "SEMID_ALERT_WEBHOOK_URL"


def load_automations(path: Path, webhook_block_id: str) -> list[AutomationCore]:
    """The automations of the file, their call-webhook actions pointed at the webhook block."""
    automations = yaml.safe_load(path.read_text())["automations"]
    for automation in automations:
        for action in automation["actions"]:
            if action["type"] == "call-webhook":
                action["block_document_id"] = webhook_block_id
    return [AutomationCore.model_validate(automation) for automation in automations]


def apply(webhook_url: str, path: Path = AUTOMATIONS) -> list[str]:
    """Save the webhook block and create or update the automations; returns what was done, one line each."""
    block_id = Webhook(url=webhook_url, headers={"Content-Type": "application/json"}).save(WEBHOOK_BLOCK,
                                                                                          overwrite=True)
    done = []
    with get_client(sync_client=True) as client:
        for automation in load_automations(path, str(block_id)):
            existing = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
                done.append(f"updated automation {automation.name!r} ({existing[0].id})")
            else:
                done.append(f"created automation {automation.name!r} ({client.create_automation(automation)})")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhook-url", default=os.environ.get(WEBHOOK_URL_ENV),
                        help=f"where the alerts are posted (default: ${WEBHOOK_URL_ENV})")
    parser.add_argument("--file", type=Path, default=AUTOMATIONS, help="the automations to apply")
    args = parser.parse_args()
    if not args.webhook_url:
        parser.error(f"no webhook URL: pass --webhook-url or set {WEBHOOK_URL_ENV}")
    for line in apply(args.webhook_url, args.file):
        print(line)


if __name__ == "__main__":
    main()
