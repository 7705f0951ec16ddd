"""navl schemas of the webhook actions."""
from __future__ import annotations

from ckan.plugins.toolkit import validator_args


@validator_args
def webhook_create_schema(not_missing, not_empty, ignore_missing, webhooks_string,
                          webhooks_topic, webhooks_topics, webhooks_address, webhooks_secret,
                          webhooks_dataset_filter, webhooks_organization_filter,
                          webhooks_group_filter):
    # ``topic`` (one string, the original API) or ``topics`` (a list), or both.
    return {
        "topic": [ignore_missing, webhooks_string, not_empty, webhooks_topics],
        "topics": [ignore_missing, webhooks_topics],
        "address": [not_missing, webhooks_string, not_empty, webhooks_address],
        "secret": [ignore_missing, webhooks_string, webhooks_secret],
        "dataset": [ignore_missing, webhooks_string, webhooks_dataset_filter],
        "organization": [ignore_missing, webhooks_string, webhooks_organization_filter],
        "group": [ignore_missing, webhooks_string, webhooks_group_filter],
    }


@validator_args
def webhook_update_schema(not_missing, not_empty, ignore_missing, webhooks_string,
                          webhooks_id, webhooks_topics, webhooks_address, webhooks_secret,
                          webhooks_dataset_filter, webhooks_organization_filter,
                          webhooks_group_filter, webhooks_boolean):
    # Only what is given changes; an empty filter or secret removes it.
    return {
        "id": [not_missing, webhooks_string, not_empty, webhooks_id],
        "topic": [ignore_missing, webhooks_string, not_empty, webhooks_topics],
        "topics": [ignore_missing, webhooks_topics],
        "address": [ignore_missing, webhooks_string, not_empty, webhooks_address],
        "secret": [ignore_missing, webhooks_string, webhooks_secret],
        "dataset": [ignore_missing, webhooks_string, webhooks_dataset_filter],
        "organization": [ignore_missing, webhooks_string, webhooks_organization_filter],
        "group": [ignore_missing, webhooks_string, webhooks_group_filter],
        "active": [ignore_missing, webhooks_boolean],
    }


@validator_args
def webhook_id_schema(not_missing, not_empty, webhooks_string, webhooks_id):
    return {"id": [not_missing, webhooks_string, not_empty, webhooks_id]}


@validator_args
def webhook_list_schema(ignore_missing, webhooks_string, webhooks_topic, one_of,
                        natural_number_validator, boolean_validator):
    from ..report import SORTS, STATES
    return {
        "topic": [ignore_missing, webhooks_string, webhooks_topic],
        "host": [ignore_missing, webhooks_string],
        "state": [ignore_missing, webhooks_string, one_of(list(STATES))],
        "sort": [ignore_missing, webhooks_string, one_of(list(SORTS))],
        "descending": [ignore_missing, boolean_validator],
        "limit": [ignore_missing, natural_number_validator],
        "offset": [ignore_missing, natural_number_validator],
    }


@validator_args
def webhook_activity_schema(ignore_missing, int_validator, webhooks_days):
    return {"days": [ignore_missing, int_validator, webhooks_days]}


@validator_args
def webhook_redeliver_failed_schema(not_missing, not_empty, ignore_missing,
                                    webhooks_string, webhooks_id, isodate):
    return {
        "since": [not_missing, webhooks_string, not_empty, isodate],
        "id": [ignore_missing, webhooks_string, webhooks_id],
    }


@validator_args
def webhook_recover_schema(not_missing, not_empty, ignore_missing, webhooks_string,
                           webhooks_id, isodate):
    return {
        "id": [not_missing, webhooks_string, not_empty, webhooks_id],
        "since": [not_missing, webhooks_string, not_empty, isodate],
        "until": [ignore_missing, webhooks_string, isodate],
    }


@validator_args
def webhook_deliveries_schema(not_missing, not_empty, ignore_missing, webhooks_string,
                              webhooks_id, natural_number_validator):
    return {
        "id": [not_missing, webhooks_string, not_empty, webhooks_id],
        "limit": [ignore_missing, natural_number_validator],
        "offset": [ignore_missing, natural_number_validator],
    }


@validator_args
def webhook_redeliver_schema(not_missing, not_empty, webhooks_string, webhooks_id):
    return {
        "id": [not_missing, webhooks_string, not_empty, webhooks_id],
        "event_id": [not_missing, webhooks_string, not_empty, webhooks_id],
    }
