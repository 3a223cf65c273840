"""Scrape /metrics and read it with prometheus-client's own parser (what Prometheus would accept)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support import Client


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.types = {family.name: family.type for family in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The one sample of that name whose labels include these (the test fails if there is none or several)."""
        found = [s.value for s in self.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0]

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


async def scrape(client: Client) -> Scrape:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    return Scrape(await response.text())
