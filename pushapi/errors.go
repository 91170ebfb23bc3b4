package pushapi

import (
	"errors"
	"fmt"
	"net/http"
	"runtime/debug"

	"github.com/labstack/echo/v4"
)

// Error codes: the "code" of every error answer. ErrorCodes lists each with
// its HTTP status; docs/api.md and openapi.json list the same set (a test
// checks both).
const (
	CodeMalformedJSON     = "malformed_json"
	CodeUnknownField      = "unknown_field"
	CodeWrongType         = "wrong_type"
	CodeBadCursor         = "bad_cursor"
	CodeBadParameter      = "bad_parameter"
	CodeUnauthorized      = "unauthorized"
	CodeNotFound          = "not_found"
	CodeNotConnected      = "not_connected"
	CodeMethodNotAllowed  = "method_not_allowed"
	CodeBodyTooLarge      = "body_too_large"
	CodePayloadTooLarge   = "payload_too_large"
	CodeInvalidTopic      = "invalid_topic"
	CodeInvalidPayload    = "invalid_payload"
	CodeInvalidQoS        = "invalid_qos"
	CodeInvalidProperties = "invalid_properties"
	CodeInvalidChannel    = "invalid_channel"
	CodeInvalidDeviceID   = "invalid_device_id"
	CodeInvalidTTL        = "invalid_ttl"
	CodeInvalidBatch      = "invalid_batch"
	CodeInvalidGroupID    = "invalid_group_id"
	CodeInvalidGroup      = "invalid_group"
	CodeGroupExists       = "group_exists"
	CodeGroupFull         = "group_full"
	CodeInternal          = "internal"
	CodePublishRejected   = "publish_rejected"
	CodeBrokerUnavailable = "broker_unavailable"
	CodeNodeUnavailable   = "node_unavailable"
	CodeStoreUnavailable  = "store_unavailable"
	CodeStoreTimeout      = "store_timeout"
)

// ErrorCode describes one error code.
type ErrorCode struct {
	Code   string
	Status int
	When   string
}

// ErrorCodes lists every error code the API answers with, and its status.
var ErrorCodes = []ErrorCode{
	{CodeMalformedJSON, http.StatusBadRequest, "The body is not one JSON value of the expected shape (syntax error, empty body, trailing data)."},
	{CodeUnknownField, http.StatusBadRequest, "The body has a field the endpoint does not know (often a typo)."},
	{CodeWrongType, http.StatusBadRequest, "A field has the wrong JSON type, e.g. a string where a number belongs."},
	{CodeBadCursor, http.StatusBadRequest, "The cursor was not returned by a previous page."},
	{CodeBadParameter, http.StatusBadRequest, "A query parameter is not valid, e.g. limit outside 1-1000."},
	{CodeUnauthorized, http.StatusUnauthorized, "No Authorization header, or not a valid API key."},
	{CodeNotFound, http.StatusNotFound, "No such endpoint, device, push subscription, group or stored message."},
	{CodeNotConnected, http.StatusNotFound, "The device is known but not connected now."},
	{CodeMethodNotAllowed, http.StatusMethodNotAllowed, "The endpoint exists but not with this method; see the Allow header."},
	{CodeBodyTooLarge, http.StatusRequestEntityTooLarge, "The request body is larger than pushapi.max_body."},
	{CodePayloadTooLarge, http.StatusRequestEntityTooLarge, "A message payload (after base64 decoding) is larger than pushapi.max_payload, or the message is larger than the broker's maximum packet size."},
	{CodeInvalidTopic, http.StatusUnprocessableEntity, "The topic (or response_topic) is empty, too long, not UTF-8, has NUL, a wildcard (+ #) or starts with $."},
	{CodeInvalidPayload, http.StatusUnprocessableEntity, "Neither or both of payload and payload_base64, or payload_base64 (or correlation_data) is not base64."},
	{CodeInvalidQoS, http.StatusUnprocessableEntity, "qos is not 0, 1 or 2."},
	{CodeInvalidProperties, http.StatusUnprocessableEntity, "A message property is not valid (UTF-8 without NUL, message_expiry 1-4294967295, reserved user property)."},
	{CodeInvalidChannel, http.StatusUnprocessableEntity, "The channel is not one topic level: empty, over 256 bytes, not UTF-8, or has NUL, / + or #."},
	{CodeInvalidDeviceID, http.StatusUnprocessableEntity, "The device ID is empty, over 256 bytes, not UTF-8, has NUL, / + or #, starts with $, or names a cluster member."},
	{CodeInvalidTTL, http.StatusUnprocessableEntity, "ttl_seconds is not between 60 and auth.token_ttl."},
	{CodeInvalidBatch, http.StatusUnprocessableEntity, "A batch holds no message or more than 1000."},
	{CodeInvalidGroupID, http.StatusUnprocessableEntity, "The group ID is empty, over 256 bytes, not UTF-8, or has NUL, / + or # (it is a level of the topic groups/{id})."},
	{CodeInvalidGroup, http.StatusUnprocessableEntity, "The group's name (UTF-8, at most 256 bytes) or attributes (at most 64; keys 1-256 bytes without '.' or a leading '$'; values UTF-8, at most 4096 bytes) are not valid."},
	{CodeGroupExists, http.StatusConflict, "A group with the ID given exists already."},
	{CodeGroupFull, http.StatusConflict, "The group would have more members than groups.max_members."},
	{CodeInternal, http.StatusInternalServerError, "A bug: the server logged it. Please report it."},
	{CodePublishRejected, http.StatusBadGateway, "The broker refused the message; the message names its MQTT reason code."},
	{CodeBrokerUnavailable, http.StatusServiceUnavailable, "No broker connection, the connection was lost before the broker acknowledged, or no acknowledgement within pushapi.publish_timeout. Retry."},
	{CodeNodeUnavailable, http.StatusServiceUnavailable, "The broker holding the device's connection did not answer; or, for a group membership change, a broker did not confirm it (the change is recorded and applied at that broker's next refresh). Retry."},
	{CodeStoreUnavailable, http.StatusServiceUnavailable, "The store (MongoDB) cannot be reached or failed. Retry."},
	{CodeStoreTimeout, http.StatusServiceUnavailable, "Timed out: the store did not answer within 5 seconds, or the request waited 10 seconds for its turn (the push API makes at most 64 store calls at once). Retry."},
}

// Error is an API error: rendered as {"error": {"code": ..., "message": ...}}
// with its Status by the one error handler.
type Error struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
	cause   error  // logged with 5xx answers, never sent
}

// ErrorBody is the JSON body of every error answer.
type ErrorBody struct {
	Error Error `json:"error"`
}

func (e *Error) Error() string { return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message) }

func (e *Error) Unwrap() error { return e.cause }

// apiErr returns an Error with the status of code.
func apiErr(code, format string, args ...any) *Error {
	msg := format
	if len(args) > 0 {
		msg = fmt.Sprintf(format, args...)
	}
	return &Error{Status: statusOf(code), Code: code, Message: msg}
}

func statusOf(code string) int {
	for _, c := range ErrorCodes {
		if c.Code == code {
			return c.Status
		}
	}
	return http.StatusInternalServerError
}

// errorHandler renders every error a handler or Echo returns as the JSON
// error body: *Error as is, Echo's own errors (404, 405, 413) with their
// codes, anything else as 500 internal after logging it.
func (p *PushAPI) errorHandler(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	var ae *Error
	var he *echo.HTTPError
	switch {
	case errors.As(err, &ae):
	case errors.As(err, &he):
		switch he.Code {
		case http.StatusNotFound:
			ae = apiErr(CodeNotFound, "no such endpoint: %s %s", c.Request().Method, c.Request().URL.Path)
		case http.StatusMethodNotAllowed:
			allow := c.Response().Header().Get(echo.HeaderAllow)
			ae = apiErr(CodeMethodNotAllowed, "%s is not allowed on %s (allowed: %s)", c.Request().Method, c.Request().URL.Path, allow)
		case http.StatusRequestEntityTooLarge:
			ae = apiErr(CodeBodyTooLarge, "the request body is larger than %d bytes", p.cfg.MaxBody)
		case http.StatusUnauthorized:
			ae = apiErr(CodeUnauthorized, "%v", he.Message)
		case http.StatusBadRequest:
			ae = apiErr(CodeMalformedJSON, "%v", he.Message)
		default:
			ae = &Error{Status: http.StatusInternalServerError, Code: CodeInternal, Message: "internal error", cause: err}
		}
	default:
		ae = &Error{Status: http.StatusInternalServerError, Code: CodeInternal, Message: "internal error", cause: err}
	}
	if ae.Code == CodeInternal {
		p.log.Error("request failed", "method", c.Request().Method, "path", c.Request().URL.Path, "route", c.Path(), "error", ae.cause)
	} else if ae.Status >= 500 {
		p.log.Warn("request answered with an error", "method", c.Request().Method, "route", c.Path(),
			"status", ae.Status, "code", ae.Code, "message", ae.Message, "cause", ae.cause)
	}
	if ae.Status == http.StatusServiceUnavailable {
		c.Response().Header().Set("Retry-After", "1")
	}
	if c.Request().Method == http.MethodHead {
		_ = c.NoContent(ae.Status)
		return
	}
	_ = c.JSON(ae.Status, ErrorBody{Error: *ae})
}

// recoverer turns a panic in a handler into a logged 500 internal answer,
// never a stack trace on the wire or a dropped connection.
func (p *PushAPI) recoverer(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) (err error) {
		defer func() {
			r := recover()
			if r == nil {
				return
			}
			if r == http.ErrAbortHandler {
				panic(r)
			}
			// The stack is logged here, where it is; the error handler logs
			// the request.
			p.log.Error("handler panicked", "method", c.Request().Method, "route", c.Path(),
				"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			err = &Error{Status: http.StatusInternalServerError, Code: CodeInternal, Message: "internal error",
				cause: fmt.Errorf("panic: %v", r)}
		}()
		return next(c)
	}
}
