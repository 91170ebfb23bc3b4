# syntax=docker/dockerfile:1
# rtm: a static binary on a distroless base, running as a non-root user.
#   docker build -t rtm .
#   docker run -p 1883:1883 -p 8083:8083 -p 9101:9101 -v rtm-data:/data rtm broker
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
VOLUME ["/data"]
# MQTT tcp/ws/tls/wss, broker admin, gossip (tcp+udp), node link, router, push API
EXPOSE 1883 8083 8883 8084 9101 7946 7946/udp 7947 8090 8080
ENTRYPOINT ["/usr/local/bin/rtm"]
CMD ["broker"]
