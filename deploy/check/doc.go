// Package check validates the deployment files in deploy/ with the tools
// their formats come from, as Go tests: the compose file with compose-go
// (the loader of Docker Compose, schema included), the Kubernetes manifests
// by strict decoding into the Kubernetes API types, the Prometheus rules
// with Prometheus's own rule parser (what promtool check rules runs), and
// the Grafana dashboard's queries with the PromQL parser. It is a module of
// its own so these tools stay out of rtm's dependencies.
package check
