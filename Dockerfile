# syntax=docker/dockerfile:1
# rtm: a static binary on a distroless base, running as a non-root user.
#   docker build -t rtm .
# Try it (every role in one container, ANONYMOUS devices, embedded store):
#   docker run -p 1883:1883 -p 8080:8080 -p 9101:9101 rtm
# Production: one role per container, device tokens required, e.g. a broker:
#   docker run -p 1883:1883 -p 9101:9101 -v rtm-data:/data \
#     -e RTM_AUTH_TOKEN_KEYS=<a secret of 16+ characters> \
#     -e RTM_BROKER_ADMIN_KEYS=<another secret of 16+ characters> \
#     -e RTM_STORE_URI=mongodb://db:27017/ -e RTM_CLUSTER_SECRET=<secret> rtm broker
# (docs/deployment.md lists what each role needs; deploy/ has a compose file
# and Kubernetes manifests.)
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
COPY third_party ./third_party
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/rtm ./cmd/rtm && mkdir -p /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/rtm /usr/local/bin/rtm
COPY --from=build --chown=65532:65532 /out/data /data
# 65532 is distroless's "nonroot" user; /data is owned by it.
USER 65532:65532
WORKDIR /data
ENV RTM_DATA=/data
# rtm dev binds loopback unless told otherwise: in a container the published
# ports must listen on every interface. The roles' own defaults are the same.
ENV RTM_BROKER_MQTT_ADDR=:1883 RTM_BROKER_WS_ADDR=:8083 RTM_BROKER_ADMIN_ADDR=:9101 RTM_ROUTER_ADDR=:8090 RTM_PUSHAPI_ADDR=:8080 RTM_WATCHDOG_ADDR=:8082
VOLUME ["/data"]
# MQTT tcp/ws/tls/wss, broker admin, gossip (tcp+udp), node link, router, push API, watchdog
EXPOSE 1883 8083 8883 8084 9101 7946 7946/udp 7947 8090 8080 8082
ENTRYPOINT ["/usr/local/bin/rtm"]
# The default command starts at once with nothing to configure; it warns
# loudly that devices are anonymous. Name a role to run it alone.
CMD ["dev"]
