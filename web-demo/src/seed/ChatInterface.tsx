// The seed page's "Cancel Button in UI" React snippet (shared/seed-request-cancellation.md),
// verbatim except: the import line names our package, the component is exported, and the two
// placeholders ("Handle response..." and "Chat UI") are filled with a minimal input and result
// line so that a browser test can drive it. `new Muxi()` needs no arguments in a browser: it
// connects to the page's own origin (ws://host/v1/ws).
import { useState } from 'react';
import { Muxi } from '@muxgate/sdk';

const client = new Muxi();

export function ChatInterface() {
  const [requestId, setRequestId] = useState<string | null>(null);
  const [isProcessing, setIsProcessing] = useState(false);
  const [result, setResult] = useState(''); // (placeholder filled in)

  const sendMessage = async (message: string) => {
    const id = `req_${Date.now()}`;
    setRequestId(id);
    setIsProcessing(true);
    
    try {
      const response = await client.chat({ message, requestId: id });
      // Handle response...
      setResult(`${response.status}${response.reason ? ` (${response.reason})` : ''}`); // (placeholder filled in)
    } finally {
      setIsProcessing(false);
      setRequestId(null);
    }
  };

  const cancelRequest = async () => {
    if (requestId) {
      await client.cancelRequest(requestId);
      setIsProcessing(false);
      setRequestId(null);
    }
  };

  return (
    <div>
      {/* Chat UI (placeholder filled in) */}
      <button onClick={() => void sendMessage('Write a very long story...')} disabled={isProcessing} data-testid="seed-send">
        Send "Write a very long story..."
      </button>{' '}
      <span data-testid="seed-result">{result}</span>{' '}
      {isProcessing && (
        <button onClick={cancelRequest}>Cancel</button>
      )}
    </div>
  );
}
