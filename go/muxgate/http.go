package muxgate

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/muxgate/muxgate/go/protocol"
)

// The HTTP API (SPEC.md §8): cancel and read a request by id, from any process.

type httpBody struct {
	RequestID string     `json:"request_id"`
	Status    string     `json:"status"`
	Reason    Reason     `json:"reason"`
	Error     *ErrorInfo `json:"error"`
	Usage     *Usage     `json:"usage"`
}

type httpError struct {
	Error *ErrorInfo `json:"error"`
}

func (c *Client) call(ctx context.Context, method, requestID, userID string) (int, []byte, error) {
	u := c.s.requestURL(requestID)
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return 0, nil, invalidf("%v", err)
	}
	req.Header = c.s.credentials()
	if userID == "" {
		userID = c.s.user
	}
	if userID != "" {
		req.Header.Set("X-Muxi-User-Id", userID)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return 0, nil, ctx.Err()
		}
		return 0, nil, &ConnectError{URL: u, Err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, nil, &ConnectError{URL: u, Err: err}
	}
	return resp.StatusCode, body, nil
}

// httpFailure maps an error status to the SDK's errors.
func httpFailure(method string, status int, body []byte) error {
	var e httpError
	code, msg := protocol.CodeInternal, fmt.Sprintf("HTTP %d", status)
	if json.Unmarshal(body, &e) == nil && e.Error != nil && e.Error.Code != "" {
		code, msg = e.Error.Code, e.Error.Message
	}
	switch status {
	case 400:
		return invalidf("%s: %s: %s", method, code, msg)
	case 401:
		code = protocol.CodeUnauthorized
	case 403:
		code = protocol.CodeForbidden
	}
	return &ProtocolError{Code: code, Message: fmt.Sprintf("%s: HTTP %d: %s", method, status, msg)}
}

// cancelHTTP is DELETE /v1/requests/{id}: cancel with reason api (SPEC.md §8.1).
func (c *Client) cancelHTTP(ctx context.Context, requestID, userID string) (CancelResult, error) {
	status, raw, err := c.call(ctx, http.MethodDelete, requestID, userID)
	if err != nil {
		return "", err
	}
	if status != 200 && status != 404 && status != 409 {
		return "", httpFailure("DELETE", status, raw)
	}
	var body httpBody
	if err := json.Unmarshal(raw, &body); err != nil || !protocol.CancelStatus(body.Status).Valid() {
		return "", &ProtocolError{Code: protocol.CodeProtocolViolation, Message: fmt.Sprintf("DELETE: unexpected body %q", raw), RequestID: requestID}
	}
	return CancelResult(body.Status), nil
}

// GetRequest is GET /v1/requests/{id} (SPEC.md §8.2): status, cancel reason, error and usage
// of a request of this user, running or remembered; Status not_found otherwise. userID ""
// means the client's default user.
func (c *Client) GetRequest(ctx context.Context, requestID, userID string) (*RequestInfo, error) {
	if c.sErr != nil {
		return nil, c.sErr
	}
	if !protocol.ValidRequestID(requestID) {
		return nil, invalidf("request id must be 1-128 characters of [A-Za-z0-9._:-]: %q", requestID)
	}
	status, raw, err := c.call(ctx, http.MethodGet, requestID, userID)
	if err != nil {
		return nil, err
	}
	if status == 404 {
		return &RequestInfo{RequestID: requestID, Status: string(ResultNotFound)}, nil
	}
	if status != 200 {
		return nil, httpFailure("GET", status, raw)
	}
	var body httpBody
	if err := json.Unmarshal(raw, &body); err != nil || body.Status == "" {
		return nil, &ProtocolError{Code: protocol.CodeProtocolViolation, Message: fmt.Sprintf("GET: unexpected body %q", raw), RequestID: requestID}
	}
	return &RequestInfo{RequestID: requestID, Status: body.Status, Reason: body.Reason, Error: body.Error, Usage: body.Usage}, nil
}
