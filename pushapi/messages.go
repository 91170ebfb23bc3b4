package pushapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/eclipse/paho.golang/paho"
	"github.com/labstack/echo/v4"
	"github.com/oklog/ulid/v2"
)

// maxBatch is the most messages one batch may hold.
const maxBatch = 1000

// MessageBody is a message without its topic: the body of
// POST /v1/channels/{channel}/messages and POST /v1/devices/{id}/messages.
type MessageBody struct {
	// Payload is the payload as text (sent as its UTF-8 bytes). Exactly one
	// of Payload and PayloadBase64 must be given; "" is an empty payload.
	Payload *string `json:"payload,omitempty"`
	// PayloadBase64 is a binary payload in standard base64.
	PayloadBase64 *string `json:"payload_base64,omitempty"`
	// QoS is 0, 1 or 2; absent means 1.
	QoS        *int        `json:"qos,omitempty"`
	Retain     bool        `json:"retain,omitempty"`
	Properties *Properties `json:"properties,omitempty"`
}

// Message is the body of POST /v1/messages, and one message of a batch.
type Message struct {
	Topic string `json:"topic"`
	MessageBody
}

// Properties are the MQTT 5 properties a message may carry.
type Properties struct {
	ContentType   string `json:"content_type,omitempty"`
	ResponseTopic string `json:"response_topic,omitempty"`
	// CorrelationData is binary, in standard base64.
	CorrelationData string `json:"correlation_data,omitempty"`
	// MessageExpiry is the message's lifetime in seconds, 1-4294967295;
	// absent means none.
	MessageExpiry *int64            `json:"message_expiry,omitempty"`
	User          map[string]string `json:"user,omitempty"`
}

// Batch is the body of POST /v1/messages/batch.
type Batch struct {
	Messages []Message `json:"messages"`
}

// Published is the answer for a published message.
type Published struct {
	ID    string `json:"id"`
	Topic string `json:"topic"`
	QoS   int    `json:"qos"`
}

// BatchResult is the answer for one message of a batch: Published, or an
// error.
type BatchResult struct {
	*Published
	Error *Error `json:"error,omitempty"`
}

// BatchResults is the answer of POST /v1/messages/batch, in the order of the
// request's messages.
type BatchResults struct {
	Results []BatchResult `json:"results"`
}

// build validates a message for topic and returns it ready to publish, with
// a new id.
func (p *PushAPI) build(topic string, b *MessageBody) (*message, *Error) {
	if why := checkTopic(topic); why != "" {
		return nil, apiErr(CodeInvalidTopic, "topic %s", why)
	}
	qos := 1
	if b.QoS != nil {
		qos = *b.QoS
	}
	if qos < 0 || qos > 2 {
		return nil, apiErr(CodeInvalidQoS, "qos must be 0, 1 or 2, got %d", qos)
	}
	var payload []byte
	switch {
	case b.Payload != nil && b.PayloadBase64 != nil:
		return nil, apiErr(CodeInvalidPayload, "give either payload (text) or payload_base64 (binary), not both")
	case b.Payload != nil:
		if len(*b.Payload) > p.cfg.MaxPayload {
			return nil, apiErr(CodePayloadTooLarge, "the payload has %d bytes, more than the %d allowed", len(*b.Payload), p.cfg.MaxPayload)
		}
		payload = []byte(*b.Payload)
	case b.PayloadBase64 != nil:
		if len(*b.PayloadBase64)/4*3 > p.cfg.MaxPayload+3 {
			return nil, apiErr(CodePayloadTooLarge, "the payload has about %d bytes, more than the %d allowed", len(*b.PayloadBase64)/4*3, p.cfg.MaxPayload)
		}
		var err error
		if payload, err = decodeBase64(*b.PayloadBase64); err != nil {
			return nil, apiErr(CodeInvalidPayload, "payload_base64 is not standard base64: %v", err)
		}
		if len(payload) > p.cfg.MaxPayload {
			return nil, apiErr(CodePayloadTooLarge, "the payload has %d bytes, more than the %d allowed", len(payload), p.cfg.MaxPayload)
		}
	default:
		return nil, apiErr(CodeInvalidPayload, `give payload (text) or payload_base64 (binary); for an empty message, "payload": ""`)
	}
	id := ulid.Make().String()
	props := &paho.PublishProperties{User: paho.UserProperties{{Key: userPropMessageID, Value: id}}}
	if pr := b.Properties; pr != nil {
		if why := checkUTF8(pr.ContentType); why != "" {
			return nil, apiErr(CodeInvalidProperties, "properties.content_type %s", why)
		}
		props.ContentType = pr.ContentType
		if pr.ResponseTopic != "" {
			if why := checkTopic(pr.ResponseTopic); why != "" {
				return nil, apiErr(CodeInvalidTopic, "properties.response_topic %s", why)
			}
			props.ResponseTopic = pr.ResponseTopic
		}
		if pr.CorrelationData != "" {
			cd, err := decodeBase64(pr.CorrelationData)
			if err != nil {
				return nil, apiErr(CodeInvalidPayload, "properties.correlation_data is not standard base64: %v", err)
			}
			if len(cd) > 65535 {
				return nil, apiErr(CodeInvalidProperties, "properties.correlation_data has %d bytes, more than 65535", len(cd))
			}
			props.CorrelationData = cd
		}
		if e := pr.MessageExpiry; e != nil {
			if *e < 1 || *e > 1<<32-1 {
				return nil, apiErr(CodeInvalidProperties, "properties.message_expiry must be 1 to 4294967295 seconds, got %d", *e)
			}
			v := uint32(*e)
			props.MessageExpiry = &v
		}
		keys := make([]string, 0, len(pr.User))
		for k := range pr.User {
			keys = append(keys, k)
		}
		slices.Sort(keys) // a stable order on the wire
		for _, k := range keys {
			v := pr.User[k]
			if strings.EqualFold(k, userPropMessageID) {
				return nil, apiErr(CodeInvalidProperties, "properties.user %q is reserved: the push API sets it to the message id", k)
			}
			if strings.EqualFold(k, userPropPublisher) {
				return nil, apiErr(CodeInvalidProperties, "properties.user %q is reserved: the push API sets it to the API key's name", k)
			}
			if why := checkUTF8(k); why != "" {
				return nil, apiErr(CodeInvalidProperties, "properties.user key %q %s", k, why)
			}
			if why := checkUTF8(v); why != "" {
				return nil, apiErr(CodeInvalidProperties, "properties.user value of %q %s", k, why)
			}
			props.User = append(props.User, paho.UserProperty{Key: k, Value: v})
		}
	}
	return &message{id: id, pub: &paho.Publish{Topic: topic, QoS: byte(qos), Retain: b.Retain, Payload: payload, Properties: props}}, nil
}

// publishError turns a publish failure into an API error.
func (p *PushAPI) publishError(err error) *Error {
	var rej *rejectError
	switch {
	case errors.As(err, &rej):
		if rej.Code == 0x89 || rej.Code == 0x97 { // server busy, quota exceeded: retry later
			return apiErr(CodeBrokerUnavailable, "the broker is busy: reason 0x%02X %s", rej.Code, rej.Reason)
		}
		return apiErr(CodePublishRejected, "the broker refused the message: reason 0x%02X %s", rej.Code, rej.Reason)
	case errors.Is(err, errTooLarge):
		return apiErr(CodePayloadTooLarge, "the message is larger than the broker's maximum packet size: %v", err)
	case errors.Is(err, errNoBroker):
		return apiErr(CodeBrokerUnavailable, "no broker connection: none is alive in the cluster, or the push API is reconnecting")
	case errors.Is(err, errConnLost):
		return &Error{Status: http.StatusServiceUnavailable, Code: CodeBrokerUnavailable, cause: err,
			Message: "the broker connection was lost before the broker acknowledged the message: it may or may not be delivered"}
	case errors.Is(err, context.DeadlineExceeded):
		return apiErr(CodeBrokerUnavailable, "no acknowledgement from the broker within %s: the message may or may not be delivered", p.cfg.PublishTimeout)
	case errors.Is(err, context.Canceled):
		return apiErr(CodeBrokerUnavailable, "the request ended before the broker acknowledged the message")
	}
	return &Error{Status: http.StatusServiceUnavailable, Code: CodeBrokerUnavailable, cause: err,
		Message: "publish failed: " + err.Error()}
}

// publishOne publishes m within the publish timeout and answers.
func (p *PushAPI) publishOne(c echo.Context, m *message) error {
	withPublisher(c, m.pub)
	ctx, cancel := context.WithTimeout(c.Request().Context(), p.cfg.PublishTimeout)
	defer cancel()
	if err := p.pub.publish(ctx, m); err != nil {
		return p.publishError(err)
	}
	return c.JSON(http.StatusOK, Published{ID: m.id, Topic: m.pub.Topic, QoS: int(m.pub.QoS)})
}

// postMessage is POST /v1/messages.
func (p *PushAPI) postMessage(c echo.Context) error {
	var req Message
	if err := decodeBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	m, e := p.build(req.Topic, &req.MessageBody)
	if e != nil {
		return e
	}
	return p.publishOne(c, m)
}

// postChannelMessage is POST /v1/channels/{channel}/messages.
func (p *PushAPI) postChannelMessage(c echo.Context) error {
	ch, err := channelParam(c)
	if err != nil {
		return err
	}
	var req MessageBody
	if err := decodeBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	m, e := p.build(pushTopic(ch), &req)
	if e != nil {
		return e
	}
	return p.publishOne(c, m)
}

// postDeviceMessage is POST /v1/devices/{id}/messages.
func (p *PushAPI) postDeviceMessage(c echo.Context) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	var req MessageBody
	if err := decodeBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	m, e := p.build(inboxTopic(id), &req)
	if e != nil {
		return e
	}
	return p.publishOne(c, m)
}

func pushTopic(channel string) string { return "push/" + channel }

func inboxTopic(device string) string { return "devices/" + device + "/inbox" }

// postBatch is POST /v1/messages/batch. Valid messages are written to the
// broker connection in the order of the batch without waiting for each
// acknowledgement (pipelined), then the acknowledgements are awaited; the
// whole batch shares one publish timeout. An invalid message gets its error
// in its result and does not stop the others.
func (p *PushAPI) postBatch(c echo.Context) error {
	var req Batch
	if err := decodeBody(c, p.cfg.MaxBody, &req); err != nil {
		return err
	}
	if n := len(req.Messages); n == 0 || n > maxBatch {
		return apiErr(CodeInvalidBatch, "a batch holds 1 to %d messages, got %d", maxBatch, n)
	}
	ctx, cancel := context.WithTimeout(c.Request().Context(), p.cfg.PublishTimeout)
	defer cancel()
	results := make([]BatchResult, len(req.Messages))
	sends := make([]sent, len(req.Messages))
	ok := make([]bool, len(req.Messages))
	for i := range req.Messages {
		m, e := p.build(req.Messages[i].Topic, &req.Messages[i].MessageBody)
		if e != nil {
			results[i].Error = e
			continue
		}
		results[i].Published = &Published{ID: m.id, Topic: m.pub.Topic, QoS: int(m.pub.QoS)}
		withPublisher(c, m.pub)
		s, err := p.pub.send(ctx, m)
		if err != nil {
			results[i] = BatchResult{Error: p.publishError(err)}
			continue
		}
		sends[i], ok[i] = s, true
	}
	for i := range sends {
		if !ok[i] {
			continue
		}
		if err := p.pub.wait(ctx, sends[i]); err != nil {
			results[i] = BatchResult{Error: p.publishError(err)}
		}
	}
	return c.JSON(http.StatusOK, BatchResults{Results: results})
}

// String describes a batch result for logs and test failures.
func (r BatchResult) String() string {
	if r.Error != nil {
		return r.Error.Error()
	}
	if r.Published == nil {
		return "<empty>"
	}
	return fmt.Sprintf("%s %s qos %d", r.ID, r.Topic, r.QoS)
}
