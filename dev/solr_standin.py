"""A Solr stand-in at the HTTP level, for tests and the demo only.

No Solr package can be installed on the machines this project is developed
on, yet CKAN calls Solr when datasets are written (index updates) and when
organizations are shown (dataset counts). This server answers just enough of
Solr's HTTP API for those calls to succeed:

* ``/solr/<core>/update``   accepts any index update and discards it;
* ``/solr/<core>/select``   answers every query with zero results;
* ``/solr/<core>/schema``   reports a CKAN 2.11 schema, which CKAN 2.11 and 2.12 both
  accept, so their version check passes.

It is not a search engine: nothing is indexed and ``package_search`` finds
nothing. ckanext-webhooks never depends on search. A real deployment points
``solr_url`` (or ``CKAN_SOLR_URL``) at a real Solr.

Usage: python dev/solr_standin.py [--host 127.0.0.1] [--port 18983]
"""
import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCHEMA = b'<?xml version="1.0"?><schema name="ckan-2.11" version="1.6"/>'
EMPTY_RESULT = {
    "responseHeader": {"status": 0, "QTime": 0, "params": {}},
    "response": {"numFound": 0, "start": 0, "docs": []},
    "facet_counts": {
        "facet_queries": {}, "facet_fields": {}, "facet_ranges": {},
        "facet_intervals": {}, "facet_heatmaps": {},
    },
}


class SolrStandIn(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, body, content_type="application/json"):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        if path.endswith("/schema") or "/admin/file" in path:
            self._answer(SCHEMA, "application/xml")
        elif path.endswith("/select"):
            self._answer(EMPTY_RESULT)
        else:  # /update and anything else: accept and discard
            self._answer({"responseHeader": {"status": 0, "QTime": 0}})

    do_GET = do_POST = _route

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18983)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), SolrStandIn)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
